#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft, combined controller + broker) on loopback,
# fetched from Maven Central with Maven: no Docker, no tarball download. Used by the
# integration-test harness and by people who want a local broker to try `cdrguard run`.
#
#   broker.sh fetch                          fetch the jars into the cache (idempotent)
#   broker.sh start DIR [PORT] [--watch PID [--discard]]
#                                            format DIR, start, wait until it answers;
#                                            prints the bootstrap address. With --watch,
#                                            the broker is stopped when PID exits; with
#                                            --discard, its data is then deleted too.
#   broker.sh stop DIR                       stop the broker started in DIR
#   broker.sh consume BOOTSTRAP TOPIC        print a topic's committed messages (key and
#                                            value, read_committed) and exit at its end
#
# Environment: KAFKA_VERSION (default 4.1.1), CDRGUARD_KAFKA_CACHE (default
# ~/.cache/cdrguard/kafka-$KAFKA_VERSION), JAVA (default java), KAFKA_HEAP (default 512m).
set -euo pipefail

KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
LOG4J_VERSION=2.24.3
CACHE=${CDRGUARD_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cdrguard/kafka-$KAFKA_VERSION}
JAVA=${JAVA:-java}

die() { echo "broker.sh: $*" >&2; exit 1; }

fetch() {
  # The console consumer (kafka-tools) joined the fetch later: a cache without it is
  # fetched again.
  if [ -f "$CACHE/.complete" ] && ls "$CACHE/libs"/kafka-tools-"$KAFKA_VERSION".jar >/dev/null 2>&1; then
    return 0
  fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Kafka"
  mkdir -p "$CACHE"
  # The broker is the kafka_2.13 artifact and its runtime dependencies; log4j's SLF4J
  # binding makes its logs go to a file instead of being dropped with a warning.
  cat >"$CACHE/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>cdrguard.local</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  echo "broker.sh: fetching Apache Kafka $KAFKA_VERSION from Maven Central into $CACHE" >&2
  (cd "$CACHE" && mvn -q -B -ntp dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory=libs) >&2 || die "Maven could not fetch Kafka $KAFKA_VERSION"
  ls "$CACHE/libs"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka_2.13 jar missing after fetch"
  touch "$CACHE/.complete"
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# A loopback port nothing listens on: random ports in 20000-60000 until one refuses a
# connection. Another process may still take it before the broker binds it; the broker
# then fails to start and says so. Ports listed as arguments are skipped (the broker
# and controller ports must differ).
# A free loopback port below the kernel's ephemeral range. A port inside that range can
# be taken while the broker is down: a client retrying 127.0.0.1:P may get P itself as
# its local port (a TCP self-connect), and a restarted broker could not bind it.
free_port() {
  local low=32768 port i taken
  if [ -r /proc/sys/net/ipv4/ip_local_port_range ]; then
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range
  fi
  local base=10000 span=$((low - 10000))
  [ "$span" -gt 1000 ] || { base=1024; span=$((low - 1024)); }
  for i in $(seq 1 200); do
    port=$((base + (RANDOM * 32768 + RANDOM) % span))
    taken=""
    for t in "$@"; do [ "$t" = "$port" ] && taken=1; done
    if [ -z "$taken" ] && ! port_open "$port"; then
      echo "$port"
      return 0
    fi
  done
  die "no free port found in $base-$((base + span - 1))"
}

# A KRaft cluster id: 16 random bytes in URL-safe base64 without padding (22
# characters), as Kafka's Uuid prints them. Kafka never hands out ids that start with
# '-' (they read as an option on a command line), so neither do we.
cluster_id() {
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '/+' '_-' | tr -d '=\n')
    [ "${#id}" -eq 22 ] || die "cannot make a cluster id (got '$id')"
    case "$id" in -*) ;; *) echo "$id"; return 0 ;; esac
  done
}

write_properties() {
  local dir=$1 port=$2 cport=$3
  # Settings for a one-node cluster that tests can restart: replication 1 everywhere,
  # no initial rebalance delay (consumer groups form at once), short transaction and
  # session timeouts so a killed processor's open transaction is aborted quickly.
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=5
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
transaction.max.timeout.ms=900000
log.retention.check.interval.ms=60000
EOF
  cat >"$dir/log4j2.properties" <<EOF
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=file
appender.file.type=File
appender.file.name=file
appender.file.fileName=$dir/broker.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=INFO
logger.state.name=state.change.logger
logger.state.level=WARN
EOF
}

start() {
  local dir=$1 port=${2:-} watch=${3:-} discard=${4:-}
  [ -n "$dir" ] || die "usage: broker.sh start DIR [PORT] [--watch PID [--discard]]"
  fetch
  mkdir -p "$dir/data"
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/broker.pid" ] && kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null; then
    die "a broker already runs from $dir (pid $(cat "$dir/broker.pid"))"
  fi
  if [ -f "$dir/server.properties" ]; then
    # A restart: same ports and settings as before (the KRaft quorum is formatted with
    # the controller's address).
    port=$(sed -n 's#^advertised.listeners=PLAINTEXT://127.0.0.1:##p' "$dir/server.properties")
  else
    port=${port:-$(free_port)}
    write_properties "$dir" "$port" "$(free_port "$port")"
    port=$(sed -n 's#^advertised.listeners=PLAINTEXT://127.0.0.1:##p' "$dir/server.properties")
  fi
  local cp="$CACHE/libs/*"
  local jopts=(-Xmx"${KAFKA_HEAP:-512m}" -XX:+UseG1GC -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$dir/log4j2.properties")
  if [ ! -f "$dir/data/meta.properties" ]; then
    local cluster
    cluster=$(cluster_id)
    "$JAVA" "${jopts[@]}" -cp "$cp" kafka.tools.StorageTool format --standalone \
      -t "$cluster" -c "$dir/server.properties" >"$dir/format.log" 2>&1 \
      || { cat "$dir/format.log" >&2; die "formatting KRaft storage failed"; }
  fi
  # A fresh log per start, so "started" below is this start's.
  if [ -f "$dir/broker.log" ]; then mv "$dir/broker.log" "$dir/broker.log.prev"; fi
  nohup "$JAVA" "${jopts[@]}" -cp "$cp" kafka.Kafka "$dir/server.properties" \
    >"$dir/stdout.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/broker.pid"
  echo "127.0.0.1:$port" >"$dir/bootstrap"
  if [ -n "$watch" ]; then
    # Stops the broker when the process that asked for it (a test run) ends, even by
    # kill -9, so no broker outlives its tests. With --discard the data goes too (a test
    # run's topics are gigabytes, and nothing reads them again), once no broker runs
    # from DIR: a test may have stopped this one and started another there.
    local clean=":"
    if [ -n "$discard" ]; then
      clean="if ! { [ -f '$dir/broker.pid' ] && kill -0 \$(cat '$dir/broker.pid') 2>/dev/null; }; then rm -rf '$dir/data'; fi"
    fi
    # The pid is killed only while DIR still names it (stop removes the file; a pid can
    # be reused); then the watcher waits for it to be gone.
    local ours="[ \"\$(cat '$dir/broker.pid' 2>/dev/null)\" = $pid ]"
    nohup bash -c "while kill -0 $watch 2>/dev/null; do sleep 1; done
      if $ours; then
        kill $pid 2>/dev/null
        for i in \$(seq 1 60); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done
        kill -9 $pid 2>/dev/null; rm -f '$dir/broker.pid'
      fi
      $clean" \
      >/dev/null 2>&1 &
  fi
  local i
  for i in $(seq 1 240); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -30 "$dir/stdout.log" "$dir/broker.log" >&2 2>/dev/null || true
      die "the broker exited during start-up (logs in $dir)"
    fi
    if port_open "$port" && grep -q "Kafka Server started" "$dir/broker.log" 2>/dev/null; then
      echo "127.0.0.1:$port"
      return 0
    fi
    sleep 0.5
  done
  kill "$pid" 2>/dev/null || true
  die "the broker did not answer within 120 s (logs in $dir)"
}

stop() {
  local dir=$1
  [ -f "$dir/broker.pid" ] || return 0
  local pid
  pid=$(cat "$dir/broker.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    local i
    for i in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/broker.pid"
}

# Kafka's own console consumer, read_committed: what a downstream store sees.
consume() {
  local bootstrap=$1 topic=$2
  fetch
  "$JAVA" -Xmx256m -Dorg.apache.logging.log4j.level=OFF -cp "$CACHE/libs/*" org.apache.kafka.tools.consumer.ConsoleConsumer \
    --bootstrap-server "$bootstrap" --topic "$topic" --from-beginning \
    --isolation-level read_committed --timeout-ms 10000 \
    --property print.key=true --property key.separator=" " 2>/dev/null || true
}

case "${1:-}" in
  fetch) fetch ;;
  consume) consume "${2:?usage: broker.sh consume BOOTSTRAP TOPIC}" "${3:?usage: broker.sh consume BOOTSTRAP TOPIC}" ;;
  start)
    shift
    dir=${1:-}; port=""; watch=""; discard=""
    shift || true
    while [ $# -gt 0 ]; do
      case "$1" in
        --watch) watch=$2; shift 2 ;;
        --discard) discard=1; shift ;;
        *) port=$1; shift ;;
      esac
    done
    [ -z "$discard" ] || [ -n "$watch" ] || die "--discard needs --watch PID"
    start "$dir" "$port" "$watch" "$discard"
    ;;
  stop) stop "${2:?usage: broker.sh stop DIR}" ;;
  *) echo "usage: broker.sh fetch | start DIR [PORT] [--watch PID [--discard]] | stop DIR | consume BOOTSTRAP TOPIC" >&2; exit 2 ;;
esac
