#!/usr/bin/env bash
# Runs the Kafka Streams peer of cdrguard's end-to-end benchmark (see README.md).
#
#   run.sh BOOTSTRAP [CONFIG...]
#   run.sh --build      (only build the jar if it is stale, then exit)
#
# BOOTSTRAP is host:port of the broker. Each CONFIG is KEY=VALUE (peer keys such as
# input.topic=cdr.raw or key.file=/tmp/keys.toml, or any Kafka Streams / client property such
# as num.stream.threads=2 or producer.linger.ms=5) or the path of a Java properties file
# holding such keys. Later ones win. The jar is built with Maven first if it is missing or
# older than the sources (offline when the local repository already has everything).
# The script becomes the JVM (exec), so SIGTERM or SIGINT to its pid commits, closes and
# exits 0. JAVA_OPTS overrides the JVM options (default: -Xmx1g).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
jar="$here/target/cdrguard-streams-peer.jar"

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi

stale=""
if [ ! -f "$jar" ]; then
  stale=1
elif [ -n "$(find "$here/pom.xml" "$here/src/main" -newer "$jar" -print -quit)" ]; then
  stale=1
fi
if [ -n "$stale" ]; then
  echo "run.sh: building $jar" >&2
  (cd "$here" && { mvn -q -B -o -DskipTests package 2>/dev/null \
      || mvn -q -B -ntp -DskipTests package; }) >&2
fi
# A benchmark builds first, so that no build lands inside a timed run.
if [ "$1" = "--build" ]; then
  exit 0
fi
bootstrap=$1
shift

args=(--bootstrap "$bootstrap")
for c in "$@"; do
  if [[ "$c" == *=* ]]; then
    args+=("$c")
  elif [ -f "$c" ]; then
    args+=(--config "$c")
  else
    echo "run.sh: $c is neither KEY=VALUE nor a properties file" >&2
    exit 2
  fi
done

# shellcheck disable=SC2086 # JAVA_OPTS is a list of options
exec java ${JAVA_OPTS:--Xmx1g} -jar "$jar" "${args[@]}"
