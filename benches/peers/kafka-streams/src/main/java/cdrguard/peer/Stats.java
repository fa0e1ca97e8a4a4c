package cdrguard.peer;

import java.util.concurrent.atomic.LongAdder;

/**
 * The app's own counters, shared by its stream threads: input records, dead letters and
 * output messages per route, so the bench can compare fan-out. Counted when a message is
 * handed to Kafka Streams; work repeated after an aborted transaction is counted again.
 */
public final class Stats {
    public final LongAdder records = new LongAdder();
    public final LongAdder deadLetters = new LongAdder();
    public final LongAdder failClosed = new LongAdder();
    public final LongAdder[] copies = new LongAdder[ExcedoPolicy.ROUTES.size()];

    public Stats() {
        for (int i = 0; i < copies.length; i++) {
            copies[i] = new LongAdder();
        }
    }

    /** Input messages: valid records and dead letters. */
    public long inputs() {
        return records.sum() + deadLetters.sum();
    }

    /** Output messages: copies and dead letters. */
    public long messages() {
        long n = deadLetters.sum();
        for (LongAdder c : copies) {
            n += c.sum();
        }
        return n;
    }

    /** One line: {@code records=N dead_letters=N copies[billing=N ...] messages=N per_input=X}. */
    public String line() {
        StringBuilder b = new StringBuilder();
        b.append("records=").append(records.sum())
                .append(" dead_letters=").append(deadLetters.sum())
                .append(" fail_closed=").append(failClosed.sum())
                .append(" copies[");
        for (int i = 0; i < copies.length; i++) {
            if (i > 0) {
                b.append(' ');
            }
            b.append(ExcedoPolicy.ROUTES.get(i).purpose().id()).append('=').append(copies[i].sum());
        }
        long in = inputs();
        long out = messages();
        b.append("] messages=").append(out)
                .append(String.format(java.util.Locale.ROOT, " messages_per_input=%.3f",
                        in == 0 ? 0.0 : (double) out / in))
                .append(" schedule_entries=0 (not emitted by this peer)");
        return b.toString();
    }
}
