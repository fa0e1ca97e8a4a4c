package cdrguard.peer;

import java.util.List;

/**
 * One usage record as DESIGN.md fixes it, bound by Jackson from the input JSON (unknown
 * fields are refused). Fields are named as on the wire.
 */
public final class Cdr {
    public String record_id;
    public String kind;
    public String msisdn;
    public String imsi;
    public String imei;
    public String other_party;
    public String start_time;
    public Long duration_s;
    public String close_cause;
    public Cell cell;
    public String serving_plmn;
    public String service_centre;
    public String apn;
    public Long charging_id;
    public String rat;
    public String ue_ip;
    public List<Usage> usage;
    public String recording_entity;
    public Long local_seq_no;

    /** start_time in epoch milliseconds, set by {@link CdrDecoder#validate}. */
    private long startMillis;

    public long startMillis() {
        return startMillis;
    }

    void startMillis(long ms) {
        this.startMillis = ms;
    }

    /** The serving cell. */
    public static final class Cell {
        public String mcc;
        public String mnc;
        public Long lac_or_tac;
        public Long cell_id;
    }

    /** Volumes of one rating group. */
    public static final class Usage {
        public Long rating_group;
        public Long ul_bytes;
        public Long dl_bytes;
    }
}
