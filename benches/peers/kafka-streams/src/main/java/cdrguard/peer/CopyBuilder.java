package cdrguard.peer;

import com.fasterxml.jackson.core.JsonFactory;
import com.fasterxml.jackson.core.JsonGenerator;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.header.Headers;
import org.apache.kafka.common.header.internals.RecordHeaders;

/**
 * Builds one copy of a record for one route: the treated record and the privacy envelope as
 * JSON ({@code {"record":{...},"envelope":{...}}}, README "Contracts"), the envelope's tags as
 * Kafka headers, and the Kafka key (the route's subscriber reference). One per stream task.
 */
public final class CopyBuilder {
    /** One output message. */
    public record Copy(byte[] key, byte[] value, Headers headers) {}

    private static final JsonFactory JSON = new JsonFactory();

    private final Pseudonymizer pseudonyms;
    private final Buffer buf = new Buffer();

    public CopyBuilder(Pseudonymizer pseudonyms) {
        this.pseudonyms = pseudonyms;
    }

    /** A reusable output buffer. */
    private static final class Buffer extends ByteArrayOutputStream {
        Buffer() {
            super(2048);
        }
    }

    private static boolean present(Cdr r, Field f) {
        return switch (f) {
            case IMEI -> r.imei != null;
            case OTHER_PARTY -> r.other_party != null;
            case DURATION_S -> r.duration_s != null;
            case CELL -> r.cell != null;
            case SERVICE_CENTRE -> r.service_centre != null;
            case APN -> r.apn != null;
            case CHARGING_ID -> r.charging_id != null;
            case UE_IP -> r.ue_ip != null;
            case USAGE -> r.usage != null;
            default -> true;
        };
    }

    /** A text field under its treatment; null when dropped (or not present). */
    private String text(Route route, Field f, String v) {
        if (v == null) {
            return null;
        }
        return switch (route.treatment(f)) {
            case KEEP -> v;
            case DROP -> null;
            case PSEUDONYMISE -> pseudonyms.pseudonym(route.purpose(), f, v);
            // The type allocation code: the device model, not the device.
            case GENERALISE -> f == Field.IMEI && v.length() >= 8 ? v.substring(0, 8) : null;
        };
    }

    public Copy build(Route route, Cdr r, String consent) {
        Purpose p = route.purpose();
        String recordId = text(route, Field.RECORD_ID, r.record_id);
        String msisdn = text(route, Field.MSISDN, r.msisdn);
        // Every copy names its record; where it may not carry the raw id, by pseudonym.
        String envelopeId = recordId != null ? recordId : pseudonyms.pseudonym(p, Field.RECORD_ID, r.record_id);
        boolean keyed = route.treatment(Field.RECORD_ID) != Treatment.KEEP
                || route.treatment(Field.MSISDN) == Treatment.PSEUDONYMISE;
        String keyId = keyed ? pseudonyms.keyId(p) : null;

        StringBuilder changed = new StringBuilder(64);
        buf.reset();
        try (JsonGenerator g = JSON.createGenerator(buf)) {
            g.writeStartObject();
            g.writeFieldName("record");
            g.writeStartObject();
            if (recordId != null) {
                g.writeStringField("record_id", recordId);
            }
            keepText(g, route, Field.KIND, r.kind);
            if (msisdn != null) {
                g.writeStringField("msisdn", msisdn);
            }
            writeText(g, route, Field.IMSI, r.imsi);
            writeText(g, route, Field.IMEI, r.imei);
            writeText(g, route, Field.OTHER_PARTY, r.other_party);
            switch (route.treatment(Field.START_TIME)) {
                case KEEP -> g.writeStringField("start_time", Rfc3339.format(r.startMillis()));
                case GENERALISE -> g.writeStringField("start_time",
                        Rfc3339.format(Rfc3339.floorHour(r.startMillis())));
                default -> { }
            }
            if (r.duration_s != null && route.treatment(Field.DURATION_S) == Treatment.KEEP) {
                g.writeNumberField("duration_s", r.duration_s);
            }
            keepText(g, route, Field.CLOSE_CAUSE, r.close_cause);
            Treatment cell = route.treatment(Field.CELL);
            if (r.cell != null && (cell == Treatment.KEEP || cell == Treatment.GENERALISE)) {
                g.writeFieldName("cell");
                g.writeStartObject();
                g.writeStringField("mcc", r.cell.mcc);
                g.writeStringField("mnc", r.cell.mnc);
                g.writeNumberField("lac_or_tac", r.cell.lac_or_tac);
                if (cell == Treatment.KEEP) {
                    g.writeNumberField("cell_id", r.cell.cell_id);
                }
                g.writeEndObject();
            }
            keepText(g, route, Field.SERVING_PLMN, r.serving_plmn);
            keepText(g, route, Field.SERVICE_CENTRE, r.service_centre);
            keepText(g, route, Field.APN, r.apn);
            if (r.charging_id != null && route.treatment(Field.CHARGING_ID) == Treatment.KEEP) {
                g.writeNumberField("charging_id", r.charging_id);
            }
            keepText(g, route, Field.RAT, r.rat);
            keepText(g, route, Field.UE_IP, r.ue_ip);
            if (r.usage != null && route.treatment(Field.USAGE) == Treatment.KEEP) {
                g.writeFieldName("usage");
                g.writeStartArray();
                for (Cdr.Usage u : r.usage) {
                    g.writeStartObject();
                    g.writeNumberField("rating_group", u.rating_group);
                    g.writeNumberField("ul_bytes", u.ul_bytes);
                    g.writeNumberField("dl_bytes", u.dl_bytes);
                    g.writeEndObject();
                }
                g.writeEndArray();
            }
            keepText(g, route, Field.RECORDING_ENTITY, r.recording_entity);
            if (route.treatment(Field.LOCAL_SEQ_NO) == Treatment.KEEP) {
                g.writeNumberField("local_seq_no", r.local_seq_no);
            }
            g.writeEndObject();

            g.writeFieldName("envelope");
            g.writeStartObject();
            g.writeStringField("record_id", envelopeId);
            g.writeStringField("purpose", p.id());
            g.writeStringField("legal_basis", route.legalBasis());
            g.writeStringField("gdpr_article", route.gdprArticle());
            g.writeStringField("policy", ExcedoPolicy.TAG);
            g.writeStringField("consent", consent);
            g.writeFieldName("treatments");
            g.writeStartObject();
            for (Field f : Field.values()) {
                Treatment t = route.treatment(f);
                if (t != Treatment.KEEP && present(r, f)) {
                    g.writeStringField(f.id(), t.id());
                    if (changed.length() > 0) {
                        changed.append(',');
                    }
                    changed.append(f.id()).append('=').append(t.id());
                }
            }
            g.writeEndObject();
            if (keyId == null) {
                g.writeNullField("key_id");
            } else {
                g.writeStringField("key_id", keyId);
            }
            g.writeFieldName("retention");
            g.writeRawValue(route.retentionJson());
            g.writeEndObject();
            g.writeEndObject();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        Headers h = new RecordHeaders();
        h.add("record_id", utf8(envelopeId));
        h.add("purpose", utf8(p.id()));
        h.add("legal_basis", utf8(route.legalBasis()));
        h.add("gdpr_article", utf8(route.gdprArticle()));
        h.add("policy", utf8(ExcedoPolicy.TAG));
        h.add("consent", utf8(consent));
        h.add("treatments", utf8(changed.toString()));
        h.add("key_id", utf8(keyId == null ? "" : keyId));
        h.add("retention", utf8(route.retentionRule()));
        byte[] key = msisdn == null ? null : utf8(msisdn);
        return new Copy(key, buf.toByteArray(), h);
    }

    private static byte[] utf8(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    /** A field that is either kept or dropped. */
    private static void keepText(JsonGenerator g, Route route, Field f, String v) throws IOException {
        if (v != null && route.treatment(f) == Treatment.KEEP) {
            g.writeStringField(f.id(), v);
        }
    }

    private void writeText(JsonGenerator g, Route route, Field f, String v) throws IOException {
        String t = text(route, f, v);
        if (t != null) {
            g.writeStringField(f.id(), t);
        }
    }
}
