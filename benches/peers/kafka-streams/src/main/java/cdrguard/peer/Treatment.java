package cdrguard.peer;

/**
 * What a purpose's copy does with a field. cdrguard also has mask and tokenise (FF1); Excedo
 * uses no mask, and its one tokenised field (marketing msisdn) is an HMAC pseudonym here.
 */
public enum Treatment {
    KEEP("keep"),
    DROP("drop"),
    PSEUDONYMISE("pseudonymise"),
    GENERALISE("generalise");

    private final String id;

    Treatment(String id) {
        this.id = id;
    }

    public String id() {
        return id;
    }
}
