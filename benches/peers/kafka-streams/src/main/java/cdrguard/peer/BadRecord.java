package cdrguard.peer;

/** A record refused to the dead letter. The reason names the field, never its value. */
public final class BadRecord extends Exception {
    public BadRecord(String reason) {
        super(reason, null, false, false);
    }
}
