//! The fixed purpose ids, record fields and data categories that policies talk about.

use serde::{Deserialize, Serialize};

/// A processing purpose; its id names the route, the replay file and consent events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Service delivery and billing.
    Billing,
    /// Information security, fraud and misuse prevention.
    Fraud,
    /// Service and network development, statistics.
    Analytics,
    /// Direct marketing.
    Marketing,
    /// Fault handling, where a policy states it separately.
    Troubleshooting,
    /// Customer care, where a policy routes CDRs to it.
    CustomerCare,
}

impl Purpose {
    /// Every purpose, in route order.
    pub const ALL: [Purpose; 6] = [
        Purpose::Billing,
        Purpose::Fraud,
        Purpose::Analytics,
        Purpose::Marketing,
        Purpose::Troubleshooting,
        Purpose::CustomerCare,
    ];
    /// How many purposes exist; sizes per-purpose arrays.
    pub const COUNT: usize = 6;

    /// The contract id (`billing`, `customer_care`, ...).
    pub const fn id(self) -> &'static str {
        match self {
            Purpose::Billing => "billing",
            Purpose::Fraud => "fraud",
            Purpose::Analytics => "analytics",
            Purpose::Marketing => "marketing",
            Purpose::Troubleshooting => "troubleshooting",
            Purpose::CustomerCare => "customer_care",
        }
    }

    /// Dense index for per-purpose arrays and bit sets.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Looks a purpose up by its id.
    pub fn from_id(s: &str) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| p.id() == s)
    }
}

/// What a field is, in the terms of DESIGN.md's record table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldClass {
    /// Technical data about the record itself.
    Metadata,
    /// Names the subscriber or their device.
    Identifier,
    /// Who, when, how long, how much, which network.
    Traffic,
    /// Where the subscriber was.
    Location,
}

/// The text fields (bit per field): those whose value a treatment may replace with a
/// computed text (a pseudonym, token, mask or generalised text). Here, beside the
/// fields, because the policy's field maps and the core's treatments both read it.
pub const TEXT_FIELDS: u32 = 1 << Field::RecordId as u32
    | 1 << Field::Msisdn as u32
    | 1 << Field::Imsi as u32
    | 1 << Field::Imei as u32
    | 1 << Field::OtherParty as u32
    | 1 << Field::ServingPlmn as u32
    | 1 << Field::ServiceCentre as u32
    | 1 << Field::Apn as u32
    | 1 << Field::UeIp as u32
    | 1 << Field::RecordingEntity as u32;

/// The data categories of the operators' policies, each with its own legal basis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Subscriber data (kunduppgifter): who the subscriber is.
    Subscriber,
    /// Traffic data (trafikdata), location and record metadata included.
    Traffic,
}

impl Category {
    /// Both categories.
    pub const ALL: [Category; 2] = [Category::Subscriber, Category::Traffic];
    /// The id used in policy files.
    pub const fn id(self) -> &'static str {
        match self {
            Category::Subscriber => "subscriber",
            Category::Traffic => "traffic",
        }
    }
}

macro_rules! fields {
    ($($variant:ident => $name:literal, $class:ident;)*) => {
        /// A field of the input record.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Field { $(#[doc = $name] $variant,)* }
        impl Field {
            /// Every field, in the record's order.
            pub const ALL: [Field; Field::COUNT] = [$(Field::$variant,)*];
            /// The JSON name.
            pub const fn name(self) -> &'static str { match self { $(Field::$variant => $name,)* } }
            /// The class of DESIGN.md's record table.
            pub const fn class(self) -> FieldClass { match self { $(Field::$variant => FieldClass::$class,)* } }
        }
    };
}

fields! {
    RecordId => "record_id", Metadata;
    Kind => "kind", Metadata;
    Msisdn => "msisdn", Identifier;
    Imsi => "imsi", Identifier;
    Imei => "imei", Identifier;
    OtherParty => "other_party", Traffic;
    StartTime => "start_time", Traffic;
    DurationS => "duration_s", Traffic;
    CloseCause => "close_cause", Metadata;
    Cell => "cell", Location;
    ServingPlmn => "serving_plmn", Traffic;
    ServiceCentre => "service_centre", Metadata;
    Apn => "apn", Traffic;
    ChargingId => "charging_id", Metadata;
    Rat => "rat", Metadata;
    UeIp => "ue_ip", Identifier;
    Usage => "usage", Traffic;
    RecordingEntity => "recording_entity", Metadata;
    LocalSeqNo => "local_seq_no", Metadata;
}

impl Field {
    /// How many fields a record has.
    pub const COUNT: usize = 19;

    /// Looks a field up by its JSON name.
    pub fn from_name(s: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == s)
    }

    /// Which category's legal basis covers this field. Location is traffic data in every
    /// source (POLICIES.md), and record metadata describes the communication.
    pub const fn category(self) -> Category {
        match self.class() {
            FieldClass::Identifier => Category::Subscriber,
            _ => Category::Traffic,
        }
    }

    /// Fields that name a person in the clear: the subscriber's identifiers and the other
    /// party. No consent-gated or analytics copy may hold one raw.
    pub const fn is_personal_identifier(self) -> bool {
        matches!(
            self,
            Field::Msisdn | Field::Imsi | Field::Imei | Field::OtherParty | Field::UeIp
        )
    }
}

/// A small set of purposes, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PurposeSet(u8);

impl PurposeSet {
    /// The empty set.
    pub const EMPTY: PurposeSet = PurposeSet(0);
    /// Whether `p` is in the set.
    pub const fn contains(self, p: Purpose) -> bool {
        self.0 & (1 << p as u8) != 0
    }
    /// Adds or removes `p`.
    pub fn set(&mut self, p: Purpose, on: bool) {
        if on {
            self.0 |= 1 << p as u8;
        } else {
            self.0 &= !(1 << p as u8);
        }
    }
    /// The set as its bits (for compact storage).
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// A set from [`PurposeSet::bits`].
    pub const fn from_bits(bits: u8) -> PurposeSet {
        PurposeSet(bits)
    }
    /// The members in route order.
    pub fn iter(self) -> impl Iterator<Item = Purpose> {
        Purpose::ALL.into_iter().filter(move |p| self.contains(*p))
    }
}

impl Serialize for Field {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}
