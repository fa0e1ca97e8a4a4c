package cdrguard.peer;

/**
 * What routing needs to know about one subscriber, folded from the control events the
 * consent table holds under that subscriber's keys (cdrguard's {@code SubscriberState}).
 */
public final class ConsentView {
    private final boolean[] consented = new boolean[Purpose.values().length];
    private final long[] consentAt = new long[Purpose.values().length];
    private final boolean[] objected = new boolean[Purpose.values().length];
    private boolean restricted;
    private boolean erased;
    private long erasedAt;
    private boolean contractEnded;
    private long contractEndedAt;
    private boolean failClosed;

    /** Empties the view for the next subscriber. */
    public void clear() {
        java.util.Arrays.fill(consented, false);
        java.util.Arrays.fill(objected, false);
        restricted = false;
        erased = false;
        contractEnded = false;
        failClosed = false;
    }

    private static Purpose purpose(String id) {
        return switch (id) {
            case "billing" -> Purpose.BILLING;
            case "fraud" -> Purpose.FRAUD;
            case "analytics" -> Purpose.ANALYTICS;
            case "marketing" -> Purpose.MARKETING;
            case "troubleshooting" -> Purpose.TROUBLESHOOTING;
            default -> null; // customer_care: not declared by Excedo, changes nothing
        };
    }

    /** Applies one event found under the subscriber's keys; null (no event) changes nothing. */
    public void apply(ControlEvent e) {
        if (e == null) {
            return;
        }
        if (e.malformed()) {
            // It might have been a withdrawal or an objection: fail closed, as cdrguard does.
            failClosed = true;
            return;
        }
        switch (e.type()) {
            case "consent" -> {
                Purpose p = purpose(e.purpose());
                if (p != null) {
                    consented[p.ordinal()] = e.flag();
                    consentAt[p.ordinal()] = e.at();
                }
            }
            case "objection" -> {
                Purpose p = purpose(e.purpose());
                if (p != null) {
                    objected[p.ordinal()] = true;
                }
            }
            case "restriction" -> restricted = e.flag();
            case "erasure" -> {
                erased = true;
                erasedAt = e.at();
            }
            case "contract_ended" -> {
                contractEnded = true;
                contractEndedAt = e.at();
            }
            default -> { }
        }
    }

    public boolean failClosed() {
        return failClosed;
    }

    /** Fail closed: as if every consent were withdrawn, every purpose objected and restricted. */
    public boolean restricted() {
        return failClosed || restricted;
    }

    public boolean objected(Purpose p) {
        return failClosed || objected[p.ordinal()];
    }

    public boolean consented(Purpose p) {
        return !failClosed && consented[p.ordinal()];
    }

    /**
     * Whether an erasure stops a purpose whose erasure effect is expire: from the request on,
     * until consent for it is granted again with a later date. A purpose without consent stays
     * stopped.
     */
    public boolean erased(Purpose consentKey) {
        if (!erased) {
            return false;
        }
        return consentKey == null || !(consented(consentKey) && consentAt[consentKey.ordinal()] > erasedAt);
    }

    /** When the contract ended, or {@link Long#MIN_VALUE} if it has not. */
    public long contractEndedAt() {
        return contractEnded ? contractEndedAt : Long.MIN_VALUE;
    }
}
