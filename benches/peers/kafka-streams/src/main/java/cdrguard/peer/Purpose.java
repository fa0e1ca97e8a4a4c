package cdrguard.peer;

/** The purposes the Excedo policy declares; their ids name routes, consent and envelopes. */
public enum Purpose {
    BILLING("billing"),
    FRAUD("fraud"),
    ANALYTICS("analytics"),
    MARKETING("marketing"),
    TROUBLESHOOTING("troubleshooting");

    private final String id;

    Purpose(String id) {
        this.id = id;
    }

    public String id() {
        return id;
    }

    /** Every purpose id DESIGN.md fixes (customer_care too, which Excedo does not declare). */
    public static boolean isKnownId(String s) {
        return s != null
                && (s.equals("billing") || s.equals("fraud") || s.equals("analytics")
                        || s.equals("marketing") || s.equals("troubleshooting")
                        || s.equals("customer_care"));
    }
}
