package cdrguard.peer;

import java.io.IOException;
import java.io.Reader;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.streams.StreamsConfig;

/**
 * The peer's settings: its own keys (topics, key, consent store, stats interval) and every
 * other key passed through to Kafka Streams ({@code num.stream.threads},
 * {@code commit.interval.ms}, {@code producer.linger.ms}, ...), from {@code --config FILE}
 * (Java properties) and {@code key=value} arguments, later ones winning.
 */
public final class PeerConfig {
    public static final String USAGE = """
            usage: java -jar cdrguard-streams-peer.jar --bootstrap HOST:PORT [--config FILE] [KEY=VALUE ...]

            Routes CDRs from the input topic to one topic per Excedo purpose, as cdrguard run does,
            with Kafka Streams (exactly_once_v2). Keys (defaults in brackets):
              input.topic [cdr.raw]             control.topic [subscriber.control]
              dead.letter.topic [cdr.dead-letter]
              topic.billing [cdr.billing] ... topic.troubleshooting [cdr.troubleshooting]
              key.file                          cdrguard key file (or env CDRGUARD_KEY_FILE);
                                                or key.id + env CDRGUARD_PEER_KEY_HEX
              consent.store [rocksdb]           rocksdb or memory: the GlobalKTable's store
              stats.interval.ms [10000]         how often counters are printed (0: never)
              application.id [cdrguard-streams-peer]   num.stream.threads [2]
              commit.interval.ms [100]          processing.guarantee [exactly_once_v2]
              state.dir [/tmp/cdrguard-streams-peer]
            Any other key goes to Kafka Streams as it is (producer.*, consumer.*, ...).
            SIGTERM or SIGINT commits, closes and exits 0.
            """;

    private final Map<String, String> values = new LinkedHashMap<>();

    private PeerConfig() {
        values.put("application.id", "cdrguard-streams-peer");
        values.put("input.topic", "cdr.raw");
        values.put("control.topic", "subscriber.control");
        values.put("dead.letter.topic", "cdr.dead-letter");
        for (Route r : ExcedoPolicy.ROUTES) {
            values.put("topic." + r.purpose().id(), "cdr." + r.purpose().id());
        }
        values.put("consent.store", "rocksdb");
        values.put("stats.interval.ms", "10000");
        values.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, "2");
        values.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, "100");
        values.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        values.put(StreamsConfig.STATE_DIR_CONFIG, "/tmp/cdrguard-streams-peer");
    }

    /** Peer keys, never passed to Kafka Streams. */
    private static boolean own(String k) {
        return k.endsWith(".topic") || k.startsWith("topic.") || k.startsWith("key.")
                || k.equals("consent.store") || k.equals("stats.interval.ms");
    }

    public static PeerConfig parse(String[] args, Map<String, String> env) throws IOException {
        PeerConfig c = new PeerConfig();
        String keyFile = env.get("CDRGUARD_KEY_FILE");
        if (keyFile != null && !keyFile.isEmpty()) {
            c.values.put("key.file", keyFile);
        }
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            switch (a) {
                case "--bootstrap" -> c.values.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, next(args, ++i, a));
                case "--config" -> {
                    Properties p = new Properties();
                    try (Reader r = Files.newBufferedReader(Path.of(next(args, ++i, a)))) {
                        p.load(r);
                    }
                    for (String k : p.stringPropertyNames()) {
                        c.values.put(k, p.getProperty(k).trim());
                    }
                }
                case "--help", "-h" -> throw new IllegalArgumentException("");
                default -> {
                    int eq = a.indexOf('=');
                    if (eq <= 0) {
                        throw new IllegalArgumentException("unexpected argument " + a + " (want KEY=VALUE)");
                    }
                    c.values.put(a.substring(0, eq).trim(), a.substring(eq + 1).trim());
                }
            }
        }
        if (!c.values.containsKey(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG)) {
            throw new IllegalArgumentException("--bootstrap HOST:PORT is required");
        }
        String store = c.get("consent.store");
        if (!store.equals("rocksdb") && !store.equals("memory")) {
            throw new IllegalArgumentException("consent.store must be rocksdb or memory");
        }
        return c;
    }

    private static String next(String[] args, int i, String flag) {
        if (i >= args.length) {
            throw new IllegalArgumentException(flag + " needs a value");
        }
        return args[i];
    }

    public String get(String k) {
        return values.get(k);
    }

    public String inputTopic() {
        return get("input.topic");
    }

    public String controlTopic() {
        return get("control.topic");
    }

    public String deadLetterTopic() {
        return get("dead.letter.topic");
    }

    public String routeTopic(Purpose p) {
        return get("topic." + p.id());
    }

    public boolean inMemoryStore() {
        return get("consent.store").equals("memory");
    }

    public long statsIntervalMs() {
        return Long.parseLong(get("stats.interval.ms"));
    }

    /** The pseudonym key: key.file, else key.id with CDRGUARD_PEER_KEY_HEX. */
    public PseudonymKey key(Map<String, String> env) throws IOException {
        if (get("key.file") != null) {
            return PseudonymKey.fromKeyFile(Path.of(get("key.file")));
        }
        String hex = env.get("CDRGUARD_PEER_KEY_HEX");
        if (hex == null || hex.isEmpty()) {
            throw new IllegalArgumentException(
                    "no pseudonym key: set key.file=FILE (or CDRGUARD_KEY_FILE), or CDRGUARD_PEER_KEY_HEX");
        }
        return PseudonymKey.fromHex(get("key.id") == null ? "k1" : get("key.id"), hex);
    }

    /** What Kafka Streams is given: every key that is not the peer's own. */
    public Properties streamsProperties() {
        Properties p = new Properties();
        values.forEach((k, v) -> {
            if (!own(k)) {
                p.put(k, v);
            }
        });
        return p;
    }

    /** A one-line summary for the log (no secrets: key material is not among the values). */
    public String summary() {
        return "bootstrap=" + get(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG)
                + " application.id=" + get("application.id")
                + " input=" + inputTopic() + " control=" + controlTopic()
                + " dead_letter=" + deadLetterTopic()
                + " guarantee=" + get(StreamsConfig.PROCESSING_GUARANTEE_CONFIG)
                + " threads=" + get(StreamsConfig.NUM_STREAM_THREADS_CONFIG)
                + " commit.interval.ms=" + get(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG)
                + " consent.store=" + get("consent.store");
    }
}
