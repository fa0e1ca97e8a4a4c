package cdrguard.peer;

import com.fasterxml.jackson.core.JsonParseException;
import com.fasterxml.jackson.core.StreamReadFeature;
import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.JsonMappingException;
import com.fasterxml.jackson.databind.MapperFeature;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.ObjectReader;
import com.fasterxml.jackson.databind.cfg.CoercionAction;
import com.fasterxml.jackson.databind.cfg.CoercionInputShape;
import com.fasterxml.jackson.databind.exc.UnrecognizedPropertyException;
import com.fasterxml.jackson.databind.json.JsonMapper;
import com.fasterxml.jackson.databind.type.LogicalType;
import java.io.IOException;
import java.util.Set;

/**
 * Parses and checks one input record with the same rules as cdrguard's decoder and
 * {@code Record::validate}: strict JSON types, no unknown fields, formats, and what each
 * kind needs.
 */
public final class CdrDecoder {
    /** Records larger than this go to the dead letter, as in cdrguard. */
    public static final int MAX_RECORD_BYTES = 64 * 1024;
    /** A record more than a day after the clock is refused (processing.max_future_ms). */
    static final long MAX_FUTURE_MS = 24L * 3600 * 1000;
    /**
     * Excedo bills on invoice settlement, so cdrguard's floor for old records is
     * processing.anchored_floor_days (10 years, 3650 days).
     */
    static final long ANCHORED_FLOOR_MS = 3650L * 24 * 3600 * 1000;

    private static final Set<String> KINDS = Set.of("moc", "mtc", "sms_mo", "sms_mt", "data");
    private static final Set<String> CLOSE_CAUSES =
            Set.of("normal", "abnormal", "partial", "volume_limit", "time_limit");
    private static final Set<String> RATS = Set.of("gsm", "umts", "lte", "nr");

    private static final ObjectReader READER = strictMapper().readerFor(Cdr.class);

    private static ObjectMapper strictMapper() {
        JsonMapper m = JsonMapper.builder()
                .disable(MapperFeature.ALLOW_COERCION_OF_SCALARS)
                .enable(DeserializationFeature.FAIL_ON_UNKNOWN_PROPERTIES)
                .enable(DeserializationFeature.FAIL_ON_TRAILING_TOKENS)
                .disable(DeserializationFeature.ACCEPT_FLOAT_AS_INT)
                .enable(StreamReadFeature.STRICT_DUPLICATE_DETECTION)
                .build();
        // Numbers and booleans are not strings (msisdn 46701234567 is refused, as in cdrguard).
        for (CoercionInputShape shape : new CoercionInputShape[] {
                CoercionInputShape.Integer, CoercionInputShape.Float, CoercionInputShape.Boolean}) {
            m.coercionConfigFor(LogicalType.Textual).setCoercion(shape, CoercionAction.Fail);
        }
        m.coercionConfigFor(LogicalType.Integer).setCoercion(CoercionInputShape.String, CoercionAction.Fail);
        m.coercionConfigFor(LogicalType.Integer).setCoercion(CoercionInputShape.Float, CoercionAction.Fail);
        return m;
    }

    private CdrDecoder() {}

    /** Decodes and validates; {@code now} bounds the record's time as cdrguard's run does. */
    public static Cdr decode(byte[] value, long now) throws BadRecord {
        if (value == null) {
            throw new BadRecord("empty message (no value)");
        }
        if (value.length > MAX_RECORD_BYTES) {
            throw new BadRecord("record of " + value.length + " bytes is larger than the limit of "
                    + MAX_RECORD_BYTES + " bytes");
        }
        Cdr r;
        try {
            r = READER.readValue(value);
        } catch (UnrecognizedPropertyException e) {
            throw new BadRecord("malformed json: unknown field " + quoteName(e.getPropertyName()));
        } catch (JsonMappingException e) {
            throw new BadRecord("malformed json: " + path(e) + "wrong type or shape");
        } catch (JsonParseException e) {
            throw new BadRecord("malformed json at line " + e.getLocation().getLineNr()
                    + ", column " + e.getLocation().getColumnNr());
        } catch (IOException e) {
            throw new BadRecord("malformed json");
        }
        if (r == null) {
            throw new BadRecord("malformed json: null");
        }
        validate(r, now);
        return r;
    }

    private static String path(JsonMappingException e) {
        StringBuilder b = new StringBuilder();
        for (JsonMappingException.Reference ref : e.getPath()) {
            if (ref.getFieldName() != null) {
                if (b.length() > 0) {
                    b.append('.');
                }
                b.append(quoteName(ref.getFieldName()));
            }
        }
        return b.length() == 0 ? "" : "field " + b + ": ";
    }

    /** A field name as a reason may carry it: short, printable ASCII only. */
    private static String quoteName(String s) {
        if (s == null) {
            return "?";
        }
        String cut = s.length() > 40 ? s.substring(0, 40) : s;
        return cut.replaceAll("[^A-Za-z0-9_]", "?");
    }

    private static BadRecord bad(String field, String what) {
        return new BadRecord("invalid record: field " + field + ": " + what);
    }

    private static <T> T required(T v, String field) throws BadRecord {
        if (v == null) {
            throw bad(field, "missing");
        }
        return v;
    }

    private static void need(boolean kindNeeds, Object v, String field) throws BadRecord {
        if (kindNeeds && v == null) {
            throw bad(field, "missing, but this kind of record needs it");
        }
        if (!kindNeeds && v != null) {
            throw bad(field, "not allowed for this kind of record");
        }
    }

    static boolean allDigits(String s) {
        if (s.isEmpty()) {
            return false;
        }
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c < '0' || c > '9') {
                return false;
            }
        }
        return true;
    }

    static boolean isE164(String s) {
        return s.length() >= 4 && s.length() <= 16 && s.charAt(0) == '+' && s.charAt(1) != '0'
                && allDigits(s.substring(1));
    }

    private static boolean nonNegative(Long v) {
        return v == null || v >= 0;
    }

    /** The checks of cdrguard's {@code Record::validate}, in its order. */
    static void validate(Cdr r, long now) throws BadRecord {
        String kind = required(r.kind, "kind");
        if (!KINDS.contains(kind)) {
            throw bad("kind", "unknown variant");
        }
        String id = required(r.record_id, "record_id");
        if (id.isEmpty() || id.length() > 128) {
            throw bad("record_id", "must be 1 to 128 characters");
        }
        if (!isE164(required(r.msisdn, "msisdn"))) {
            throw bad("msisdn", "not an E.164 number");
        }
        String imsi = required(r.imsi, "imsi");
        if (imsi.length() != 15 || !allDigits(imsi)) {
            throw bad("imsi", "must be 15 digits");
        }
        if (r.imei != null && (r.imei.length() < 14 || r.imei.length() > 16 || !allDigits(r.imei))) {
            throw bad("imei", "must be 14 to 16 digits");
        }
        boolean call = kind.equals("moc") || kind.equals("mtc");
        boolean sms = kind.equals("sms_mo") || kind.equals("sms_mt");
        boolean data = kind.equals("data");
        if (r.other_party == null && (call || kind.equals("sms_mo"))) {
            throw bad("other_party", "missing, but this kind of record needs it");
        }
        if (r.other_party != null && data) {
            throw bad("other_party", "not allowed for this kind of record");
        }
        if (r.other_party != null && !isE164(r.other_party)) {
            throw bad("other_party", "not an E.164 number");
        }
        long start;
        try {
            start = Rfc3339.parse(required(r.start_time, "start_time"));
        } catch (IllegalArgumentException e) {
            throw bad("start_time", "not an RFC 3339 timestamp");
        }
        if (start > now + MAX_FUTURE_MS) {
            throw bad("start_time", "more than 1 day after the clock");
        }
        if (start < now - ANCHORED_FLOOR_MS) {
            throw bad("start_time", "older than every route keeps copies");
        }
        r.startMillis(start);
        need(call || data, r.duration_s, "duration_s");
        if (r.duration_s != null && (r.duration_s < 0 || r.duration_s > 0xFFFF_FFFFL)) {
            throw bad("duration_s", "out of range");
        }
        if (!CLOSE_CAUSES.contains(required(r.close_cause, "close_cause"))) {
            throw bad("close_cause", "unknown variant");
        }
        if (r.cell != null) {
            Cdr.Cell c = r.cell;
            required(c.lac_or_tac, "cell.lac_or_tac");
            required(c.cell_id, "cell.cell_id");
            if (c.mcc == null || c.mnc == null || c.mcc.length() != 3 || !allDigits(c.mcc)
                    || c.mnc.length() < 2 || c.mnc.length() > 3 || !allDigits(c.mnc)) {
                throw bad("cell", "mcc must be 3 digits and mnc 2 or 3");
            }
            if (c.lac_or_tac < 0 || c.lac_or_tac > 0xFFFF_FFFFL || c.cell_id < 0) {
                throw bad("cell", "out of range");
            }
        }
        String plmn = required(r.serving_plmn, "serving_plmn");
        if (plmn.length() < 5 || plmn.length() > 6 || !allDigits(plmn)) {
            throw bad("serving_plmn", "must be MCCMNC, 5 or 6 digits");
        }
        need(sms, r.service_centre, "service_centre");
        if (r.service_centre != null && !isE164(r.service_centre)) {
            throw bad("service_centre", "not an E.164 number");
        }
        need(data, r.apn, "apn");
        need(data, r.charging_id, "charging_id");
        need(data, r.ue_ip, "ue_ip");
        need(data, r.usage, "usage");
        if (!nonNegative(r.charging_id)) {
            throw bad("charging_id", "out of range");
        }
        if (r.ue_ip != null && !IpAddresses.isIp(r.ue_ip)) {
            throw bad("ue_ip", "not an IPv4 or IPv6 address");
        }
        if (r.usage != null) {
            for (Cdr.Usage u : r.usage) {
                if (u == null || u.rating_group == null || u.ul_bytes == null || u.dl_bytes == null
                        || u.rating_group < 0 || u.ul_bytes < 0 || u.dl_bytes < 0) {
                    throw bad("usage", "each entry needs rating_group, ul_bytes and dl_bytes");
                }
            }
        }
        if (!RATS.contains(required(r.rat, "rat"))) {
            throw bad("rat", "unknown variant");
        }
        if (required(r.recording_entity, "recording_entity").isEmpty()) {
            throw bad("recording_entity", "must not be empty");
        }
        if (!nonNegative(required(r.local_seq_no, "local_seq_no"))) {
            throw bad("local_seq_no", "out of range");
        }
    }
}
