package cdrguard.peer;

import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;

/**
 * An output message on its way to a branch: which topic it goes to (a route's index in
 * {@link ExcedoPolicy#ROUTES}, or {@link #DEAD_LETTER}) and its bytes.
 */
public record Routed(int target, byte[] bytes) {
    public static final int DEAD_LETTER = -1;

    /** Writes only the bytes; the target is spent by the branch that chose the topic. */
    public static final Serde<Routed> SERDE = Serdes.serdeFrom(
            (topic, r) -> r == null ? null : r.bytes(),
            (topic, b) -> b == null ? null : new Routed(DEAD_LETTER, b));
}
