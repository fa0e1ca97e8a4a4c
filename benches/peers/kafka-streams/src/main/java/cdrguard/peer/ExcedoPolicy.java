package cdrguard.peer;

import static cdrguard.peer.Field.*;
import static cdrguard.peer.Treatment.*;

import java.util.List;
import java.util.Map;

/**
 * policies/excedo.toml (version 2018-05-25) written out by hand: the one policy this peer
 * serves. A Kafka Streams team would hard-code or configure its rules like this rather than
 * compile the operator's policy file; the values below are those cdrguard's loader derives
 * from that file (legal basis tags and retention objects as `cdrguard replay` writes them).
 */
public final class ExcedoPolicy {
    private ExcedoPolicy() {}

    /** The envelope's policy tag, id@version. */
    public static final String TAG = "excedo@2018-05-25";

    private static String retention(String rule, String anchor, String after, boolean assumption) {
        return "{\"rule\":\"" + rule + "\",\"anchor\":\"" + anchor + "\",\"after\":\"" + after
                + "\",\"assumption\":" + assumption + "}";
    }

    private static Route route(Purpose p, String basis, String article, Purpose consentKey,
            boolean restrictionStops, boolean objectionStops, boolean erasureStops,
            String anchor, int months, String after, boolean assumption,
            Map<Field, Treatment> fields) {
        String rule = "excedo." + p.id();
        return new Route(p, basis, article, consentKey, restrictionStops, objectionStops,
                erasureStops, anchor, months, rule, retention(rule, anchor, after, assumption),
                Route.fields(fields));
    }

    /** Every field kept except those named, which get the given treatments. */
    private static Map<Field, Treatment> keepAllBut(Object... pairs) {
        java.util.EnumMap<Field, Treatment> m = new java.util.EnumMap<>(Field.class);
        for (Field f : Field.values()) {
            m.put(f, KEEP);
        }
        for (int i = 0; i < pairs.length; i += 2) {
            m.put((Field) pairs[i], (Treatment) pairs[i + 1]);
        }
        return m;
    }

    /** Every field dropped except those named. */
    private static Map<Field, Treatment> dropAllBut(Object... pairs) {
        java.util.EnumMap<Field, Treatment> m = new java.util.EnumMap<>(Field.class);
        for (Field f : Field.values()) {
            m.put(f, DROP);
        }
        for (int i = 0; i < pairs.length; i += 2) {
            m.put((Field) pairs[i], (Treatment) pairs[i + 1]);
        }
        return m;
    }

    /** The routes in cdrguard's route order. */
    public static final List<Route> ROUTES = List.of(
            // Contract; restriction continues (legal claim), objection not applicable,
            // erasure retains (legal obligation). Invoice-anchored retention.
            route(Purpose.BILLING, "contract", "6(1)(b)", null, false, false, false,
                    "invoice_settled", 6, "6 months", false,
                    keepAllBut(IMEI, DROP, CELL, DROP, UE_IP, DROP)),
            // Legal obligation (traffic data); every field kept.
            route(Purpose.FRAUD, "legal_obligation", "6(1)(c)", null, false, false, false,
                    "event_time", 6, "6 months", true,
                    keepAllBut()),
            // Consent (traffic data), no copy without it; restriction, objection and erasure
            // stop it.
            route(Purpose.ANALYTICS, "consent", "6(1)(a)", Purpose.ANALYTICS, true, true, true,
                    "event_time", 12, "1 year", true,
                    keepAllBut(RECORD_ID, PSEUDONYMISE, MSISDN, PSEUDONYMISE, IMSI, DROP,
                            IMEI, GENERALISE, OTHER_PARTY, DROP, START_TIME, GENERALISE,
                            CELL, GENERALISE, SERVICE_CENTRE, DROP, CHARGING_ID, DROP,
                            UE_IP, DROP, LOCAL_SEQ_NO, DROP)),
            // Consent, as analytics. cdrguard tokenises the msisdn (FF1, reversible by the
            // marketing key holder); this peer pseudonymises it with HMAC-SHA256.
            route(Purpose.MARKETING, "consent", "6(1)(a)", Purpose.MARKETING, true, true, true,
                    "event_time", 12, "1 year", true,
                    dropAllBut(KIND, KEEP, MSISDN, PSEUDONYMISE, START_TIME, GENERALISE,
                            DURATION_S, KEEP, USAGE, KEEP)),
            // Contract; restriction stops it, erasure expires it (no consent can lift that).
            route(Purpose.TROUBLESHOOTING, "contract", "6(1)(b)", null, true, false, true,
                    "contract_end", 12, "1 year", false,
                    keepAllBut(UE_IP, DROP)));
}
