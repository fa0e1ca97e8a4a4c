package cdrguard.peer;

/** The record's fields in DESIGN.md order: the order a copy writes them and lists treatments. */
public enum Field {
    RECORD_ID, KIND, MSISDN, IMSI, IMEI, OTHER_PARTY, START_TIME, DURATION_S, CLOSE_CAUSE, CELL,
    SERVING_PLMN, SERVICE_CENTRE, APN, CHARGING_ID, RAT, UE_IP, USAGE, RECORDING_ENTITY,
    LOCAL_SEQ_NO;

    private final String id = name().toLowerCase(java.util.Locale.ROOT);

    /** The JSON field name. */
    public String id() {
        return id;
    }
}
