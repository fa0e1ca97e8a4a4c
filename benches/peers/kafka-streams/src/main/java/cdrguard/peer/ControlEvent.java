package cdrguard.peer;

import com.fasterxml.jackson.core.JsonFactory;
import com.fasterxml.jackson.core.JsonParser;
import com.fasterxml.jackson.core.JsonToken;
import com.fasterxml.jackson.core.StreamReadFeature;
import java.io.IOException;

/**
 * A subscriber control event (DESIGN.md), as the consent table holds it under its key
 * {@code msisdn/type[/purpose]}. Parsing never throws: an unreadable event is
 * {@link #MALFORMED}, which routes its subscriber fail closed, as cdrguard does.
 *
 * @param purpose consent and objection only
 * @param flag consent: granted; restriction: active
 */
public record ControlEvent(String type, String msisdn, long at, String purpose, boolean flag) {

    /** An event that could not be read: its key's subscriber is routed fail closed. */
    public static final ControlEvent MALFORMED = new ControlEvent("malformed", "", 0, null, false);

    private static final JsonFactory JSON = JsonFactory.builder()
            .enable(StreamReadFeature.STRICT_DUPLICATE_DETECTION).build();

    public boolean malformed() {
        return this == MALFORMED;
    }

    /** Reads one event with the checks of cdrguard's {@code RawControl::into_event}. */
    public static ControlEvent parse(byte[] value) {
        if (value == null) {
            return null;
        }
        String type = null, msisdn = null, purpose = null, at = null, start = null, end = null;
        Boolean granted = null, active = null;
        try (JsonParser p = JSON.createParser(value)) {
            if (p.nextToken() != JsonToken.START_OBJECT) {
                return MALFORMED;
            }
            JsonToken t;
            while ((t = p.nextToken()) == JsonToken.FIELD_NAME) {
                String name = p.currentName();
                JsonToken v = p.nextToken();
                switch (name) {
                    case "type" -> type = text(p, v);
                    case "msisdn" -> msisdn = text(p, v);
                    case "at" -> at = text(p, v);
                    case "purpose" -> purpose = text(p, v);
                    case "period_start" -> start = text(p, v);
                    case "period_end" -> end = text(p, v);
                    case "granted" -> granted = bool(v);
                    case "active" -> active = bool(v);
                    default -> {
                        return MALFORMED;
                    }
                }
            }
            if (t != JsonToken.END_OBJECT || p.nextToken() != null) {
                return MALFORMED;
            }
        } catch (IOException | IllegalArgumentException e) {
            return MALFORMED;
        }
        if (type == null || msisdn == null || at == null || !CdrDecoder.isE164(msisdn)) {
            return MALFORMED;
        }
        long atMs;
        try {
            atMs = Rfc3339.parse(at);
        } catch (IllegalArgumentException e) {
            return MALFORMED;
        }
        if (purpose != null && !Purpose.isKnownId(purpose)) {
            return MALFORMED;
        }
        boolean hasPeriod = start != null || end != null;
        return switch (type) {
            case "consent" -> purpose != null && granted != null && active == null && !hasPeriod
                    ? new ControlEvent(type, msisdn, atMs, purpose, granted) : MALFORMED;
            case "objection" -> purpose != null && granted == null && active == null && !hasPeriod
                    ? new ControlEvent(type, msisdn, atMs, purpose, false) : MALFORMED;
            case "restriction" -> purpose == null && granted == null && active != null && !hasPeriod
                    ? new ControlEvent(type, msisdn, atMs, null, active) : MALFORMED;
            case "erasure", "contract_ended" ->
                    purpose == null && granted == null && active == null && !hasPeriod
                            ? new ControlEvent(type, msisdn, atMs, null, false) : MALFORMED;
            case "invoice_settled" -> invoice(type, msisdn, atMs, purpose, granted, active, start, end);
            default -> MALFORMED;
        };
    }

    private static ControlEvent invoice(String type, String msisdn, long at, String purpose,
            Boolean granted, Boolean active, String start, String end) {
        if (purpose != null || granted != null || active != null || start == null || end == null) {
            return MALFORMED;
        }
        try {
            long s = Rfc3339.parse(start), e = Rfc3339.parse(end);
            if (s >= e || s % Rfc3339.HOUR_MS != 0 || e % Rfc3339.HOUR_MS != 0) {
                return MALFORMED;
            }
        } catch (IllegalArgumentException x) {
            return MALFORMED;
        }
        return new ControlEvent(type, msisdn, at, null, false);
    }

    private static String text(JsonParser p, JsonToken v) throws IOException {
        if (v != JsonToken.VALUE_STRING) {
            throw new IllegalArgumentException("not a string");
        }
        return p.getText();
    }

    private static Boolean bool(JsonToken v) {
        if (v == JsonToken.VALUE_TRUE) {
            return Boolean.TRUE;
        }
        if (v == JsonToken.VALUE_FALSE) {
            return Boolean.FALSE;
        }
        throw new IllegalArgumentException("not a boolean");
    }
}
