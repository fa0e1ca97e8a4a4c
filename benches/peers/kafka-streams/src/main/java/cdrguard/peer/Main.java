package cdrguard.peer;

import java.lang.management.ManagementFactory;
import java.time.Duration;
import java.time.Instant;
import java.util.Locale;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicInteger;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import sun.misc.Signal;

/** Starts the peer, prints its counters, and stops cleanly on SIGTERM or SIGINT (exit 0). */
public final class Main {
    private Main() {}

    static void log(String msg) {
        System.out.println(Instant.now() + " cdrguard-streams-peer " + msg);
        System.out.flush();
    }

    /** The process's CPU time so far (user + system), in seconds. */
    static double cpuSeconds() {
        var os = ManagementFactory.getOperatingSystemMXBean();
        if (os instanceof com.sun.management.OperatingSystemMXBean sun) {
            return sun.getProcessCpuTime() / 1e9;
        }
        return Double.NaN;
    }

    public static void main(String[] args) throws Exception {
        // Kafka's own INFO lines would drown the counters; WARN and above still show.
        if (System.getProperty("org.slf4j.simpleLogger.defaultLogLevel") == null) {
            System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        }
        PeerConfig config;
        PseudonymKey key;
        try {
            config = PeerConfig.parse(args, System.getenv());
            key = config.key(System.getenv());
        } catch (IllegalArgumentException | java.io.IOException e) {
            if (e.getMessage() != null && !e.getMessage().isEmpty()) {
                System.err.println("error: " + e.getMessage());
            }
            System.err.print(PeerConfig.USAGE);
            System.exit(2);
            return;
        }

        Stats stats = new Stats();
        Topology topology = PeerTopology.build(config, key, stats, System::currentTimeMillis);
        KafkaStreams streams = new KafkaStreams(topology, config.streamsProperties());
        CountDownLatch stop = new CountDownLatch(1);
        AtomicInteger exit = new AtomicInteger(0);
        long started = System.nanoTime();

        streams.setUncaughtExceptionHandler(e -> {
            log("stopping on an uncaught error: " + e);
            exit.set(1);
            stop.countDown();
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.RUNNING && before == KafkaStreams.State.REBALANCING) {
                log(String.format(Locale.ROOT, "running after %.1f s (consent table loaded)",
                        (System.nanoTime() - started) / 1e9));
            } else if (now == KafkaStreams.State.ERROR) {
                log("Kafka Streams is in state ERROR");
                exit.set(1);
                stop.countDown();
            }
        });
        Signal.handle(new Signal("TERM"), s -> stop.countDown());
        Signal.handle(new Signal("INT"), s -> stop.countDown());

        log("starting: " + config.summary());
        log("note: no retention-schedule entries, no retention expiries, no anonymised crowds "
                + "(cdrguard writes schedule entries in the same transaction; this peer does not)");
        streams.start();

        Thread reporter = null;
        long every = config.statsIntervalMs();
        if (every > 0) {
            reporter = new Thread(() -> report(stats, every), "stats");
            reporter.setDaemon(true);
            reporter.start();
        }
        stop.await();
        log("stopping: committing and closing");
        boolean closed = streams.close(Duration.ofSeconds(30));
        if (reporter != null) {
            reporter.interrupt();
        }
        log(String.format(Locale.ROOT, "stopped%s after %.1f s: %s cpu_s=%.2f",
                closed ? "" : " (close timed out)", (System.nanoTime() - started) / 1e9,
                stats.line(), cpuSeconds()));
        System.exit(closed ? exit.get() : 1);
    }

    private static void report(Stats stats, long everyMs) {
        long lastIn = 0;
        long lastAt = System.nanoTime();
        while (!Thread.currentThread().isInterrupted()) {
            try {
                Thread.sleep(everyMs);
            } catch (InterruptedException e) {
                return;
            }
            long in = stats.inputs();
            long at = System.nanoTime();
            double rate = (in - lastIn) / ((at - lastAt) / 1e9);
            log(String.format(Locale.ROOT, "%s input_rate=%.0f/s cpu_s=%.2f", stats.line(), rate, cpuSeconds()));
            lastIn = in;
            lastAt = at;
        }
    }
}
