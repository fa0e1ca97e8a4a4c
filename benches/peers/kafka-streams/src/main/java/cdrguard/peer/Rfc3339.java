package cdrguard.peer;

import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.time.ZonedDateTime;
import java.time.format.DateTimeParseException;

/** RFC 3339 timestamps as cdrguard reads and writes them: UTC with milliseconds. */
public final class Rfc3339 {
    static final long HOUR_MS = 3_600_000L;
    static final long DAY_MS = 24 * HOUR_MS;

    private Rfc3339() {}

    private static int digits(String s, int from, int to) {
        int v = 0;
        for (int i = from; i < to; i++) {
            char c = s.charAt(i);
            if (c < '0' || c > '9') {
                return -1;
            }
            v = v * 10 + (c - '0');
        }
        return v;
    }

    /** Epoch milliseconds; the canonical form takes a fast path, other offsets java.time. */
    public static long parse(String s) {
        if (s.length() == 24 && s.charAt(4) == '-' && s.charAt(7) == '-' && s.charAt(10) == 'T'
                && s.charAt(13) == ':' && s.charAt(16) == ':' && s.charAt(19) == '.'
                && s.charAt(23) == 'Z') {
            int y = digits(s, 0, 4), mo = digits(s, 5, 7), d = digits(s, 8, 10);
            int h = digits(s, 11, 13), mi = digits(s, 14, 16), sec = digits(s, 17, 19);
            int ms = digits(s, 20, 23);
            if (y >= 0 && mo >= 1 && mo <= 12 && d >= 1 && d <= daysInMonth(y, mo) && h >= 0
                    && h <= 23 && mi >= 0 && mi <= 59 && sec >= 0 && sec <= 59 && ms >= 0) {
                long days = daysFromCivil(y, mo, d);
                return (days * 86_400 + h * 3600L + mi * 60L + sec) * 1000 + ms;
            }
            throw new IllegalArgumentException("not RFC 3339");
        }
        try {
            return OffsetDateTime.parse(s).toInstant().toEpochMilli();
        } catch (DateTimeParseException e) {
            throw new IllegalArgumentException("not RFC 3339");
        }
    }

    /** The canonical form, e.g. 2026-03-02T10:15:30.250Z. */
    public static String format(long millis) {
        long days = Math.floorDiv(millis, DAY_MS);
        long rem = Math.floorMod(millis, DAY_MS);
        long[] ymd = civilFromDays(days);
        char[] b = new char[24];
        put(b, 0, 4, ymd[0]);
        b[4] = '-';
        put(b, 5, 2, ymd[1]);
        b[7] = '-';
        put(b, 8, 2, ymd[2]);
        b[10] = 'T';
        put(b, 11, 2, rem / HOUR_MS);
        b[13] = ':';
        put(b, 14, 2, rem / 60_000 % 60);
        b[16] = ':';
        put(b, 17, 2, rem / 1000 % 60);
        b[19] = '.';
        put(b, 20, 3, rem % 1000);
        b[23] = 'Z';
        return new String(b);
    }

    public static long floorHour(long millis) {
        return Math.floorDiv(millis, HOUR_MS) * HOUR_MS;
    }

    public static long floorDay(long millis) {
        return Math.floorDiv(millis, DAY_MS) * DAY_MS;
    }

    /** Whole calendar months later, the day clamped (31 Jan + 1 month = end of February). */
    public static long addMonths(long millis, int months) {
        ZonedDateTime t = java.time.Instant.ofEpochMilli(millis).atZone(ZoneOffset.UTC);
        return t.plusMonths(months).toInstant().toEpochMilli();
    }

    private static void put(char[] b, int at, int width, long v) {
        for (int i = at + width - 1; i >= at; i--) {
            b[i] = (char) ('0' + v % 10);
            v /= 10;
        }
    }

    private static int daysInMonth(int y, int m) {
        return switch (m) {
            case 2 -> (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 ? 29 : 28;
            case 4, 6, 9, 11 -> 30;
            default -> 31;
        };
    }

    // Proleptic Gregorian day counts from 1970-01-01 (Howard Hinnant's civil algorithms).
    static long daysFromCivil(long y, int m, int d) {
        y -= m <= 2 ? 1 : 0;
        long era = Math.floorDiv(y, 400);
        long yoe = y - era * 400;
        long doy = (153L * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
        long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        return era * 146097 + doe - 719468;
    }

    static long[] civilFromDays(long z) {
        z += 719468;
        long era = Math.floorDiv(z, 146097);
        long doe = z - era * 146097;
        long yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
        long y = yoe + era * 400;
        long doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        long mp = (5 * doy + 2) / 153;
        long d = doy - (153 * mp + 2) / 5 + 1;
        long m = mp < 10 ? mp + 3 : mp - 9;
        return new long[] {m <= 2 ? y + 1 : y, m, d};
    }
}
