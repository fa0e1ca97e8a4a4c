package cdrguard.peer;

import java.util.EnumMap;
import java.util.Map;

/**
 * One purpose of the policy as routing needs it: its legal basis, consent, what the
 * subscriber's rights do to it, its retention rule and its field map.
 *
 * @param consentKey the purpose whose consent grants it, or null when none is needed
 * @param anchor the retention anchor: event_time, contract_end or invoice_settled
 * @param months the retention period after the anchor
 * @param retentionJson the envelope's retention object, fixed per route
 */
public record Route(
        Purpose purpose,
        String legalBasis,
        String gdprArticle,
        Purpose consentKey,
        boolean restrictionStops,
        boolean objectionStops,
        boolean erasureStops,
        String anchor,
        int months,
        String retentionRule,
        String retentionJson,
        Treatment[] treatments) {

    /** A field map from the policy's entries; every field must be listed. */
    static Treatment[] fields(Map<Field, Treatment> map) {
        EnumMap<Field, Treatment> m = new EnumMap<>(map);
        Treatment[] out = new Treatment[Field.values().length];
        for (Field f : Field.values()) {
            Treatment t = m.get(f);
            if (t == null) {
                throw new IllegalArgumentException("field map leaves out " + f.id());
            }
            out[f.ordinal()] = t;
        }
        return out;
    }

    public Treatment treatment(Field f) {
        return treatments[f.ordinal()];
    }

    /** Whether the copy's Kafka key (the route's subscriber reference) is a pseudonym. */
    public boolean subscriberPseudonymised() {
        return treatment(Field.MSISDN) == Treatment.PSEUDONYMISE;
    }
}
