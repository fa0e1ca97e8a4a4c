package cdrguard.peer;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.time.Instant;
import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;

/** The hand-written time parsing and formatting agree with java.time. */
class Rfc3339Test {
    @Test
    void formatAndParseAgreeWithJavaTime() {
        SplittableRandom rnd = new SplittableRandom(7);
        for (int i = 0; i < 100_000; i++) {
            long ms = rnd.nextLong(-2_000_000_000_000L, 250_000_000_000_000L);
            String s = Rfc3339.format(ms);
            String expected = java.time.format.DateTimeFormatter.ofPattern("uuuu-MM-dd'T'HH:mm:ss.SSS'Z'")
                    .withZone(java.time.ZoneOffset.UTC).format(Instant.ofEpochMilli(ms));
            assertEquals(expected, s);
            assertEquals(ms, Rfc3339.parse(s));
        }
    }

    @Test
    void otherOffsetsAndBadDates() {
        assertEquals(Rfc3339.parse("2026-01-01T00:00:00.000Z"), Rfc3339.parse("2026-01-01T01:00:00+01:00"));
        assertThrows(IllegalArgumentException.class, () -> Rfc3339.parse("2026-02-30T00:00:00.000Z"));
        assertThrows(IllegalArgumentException.class, () -> Rfc3339.parse("yesterday"));
        assertEquals(Rfc3339.parse("2026-02-28T00:00:00.000Z"),
                Rfc3339.addMonths(Rfc3339.parse("2026-01-31T00:00:00.000Z"), 1));
    }
}
