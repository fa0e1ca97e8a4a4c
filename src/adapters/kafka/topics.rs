//! The topics `cdrguard run` needs, with the settings it relies on, and their creation.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::config::RunConfig;
use crate::policy::Policy;

/// One topic to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    /// Name.
    pub name: String,
    /// What it carries.
    pub role: &'static str,
    /// Partitions.
    pub partitions: i32,
    /// Topic configs (e.g. `cleanup.policy=compact`).
    pub configs: Vec<(&'static str, &'static str)>,
}

/// How long the dead-letter topic keeps a refused record: seven days.
pub const DEAD_LETTER_RETENTION_MS: &str = "604800000";

/// Every topic of a configuration: input and routes with `partitions` partitions; the
/// schedule topic with as many as the input (each input partition owns the windows of
/// the same partition) and compacted, as is the control topic (the latest event per key
/// is the state).
pub fn specs(cfg: &RunConfig, policy: &Policy, partitions: i32) -> Vec<TopicSpec> {
    let compacted = vec![("cleanup.policy", "compact")];
    let mut v = vec![
        TopicSpec {
            name: cfg.input_topic.clone(),
            role: "input records",
            partitions,
            configs: vec![],
        },
        TopicSpec {
            name: cfg.control_topic.clone(),
            role: "subscriber control events",
            partitions,
            configs: compacted.clone(),
        },
        TopicSpec {
            name: cfg.dead_letter_topic.clone(),
            role: "refused records",
            partitions: 1,
            // Refused records are raw records, personal data under no route's rule: kept
            // a week to find and fix what refused them, never at a broker's open-ended
            // default.
            configs: vec![("retention.ms", DEAD_LETTER_RETENTION_MS)],
        },
        TopicSpec {
            name: cfg.schedule_topic.clone(),
            role: "retention windows",
            partitions,
            // While a partition is read back, its windows are written with only that
            // moment's copies and written again whole once the reading is done; an hour
            // keeps the older, whole entries from being compacted away meanwhile.
            configs: vec![
                ("cleanup.policy", "compact"),
                ("min.compaction.lag.ms", "3600000"),
            ],
        },
        TopicSpec {
            name: cfg.retention_topic.clone(),
            role: "retention-expiry events",
            partitions,
            configs: vec![],
        },
    ];
    for r in policy.declared() {
        if let Some(t) = &cfg.routes[r.purpose as usize] {
            v.push(TopicSpec {
                name: t.clone(),
                role: r.purpose.id(),
                partitions,
                configs: vec![],
            });
        }
    }
    v
}

/// Why topics could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The admin client failed.
    #[error("admin client: {0}")]
    Kafka(#[from] KafkaError),
    /// The broker refused one topic.
    #[error("creating topic {topic}: {code}")]
    Create {
        /// The topic.
        topic: String,
        /// The broker's answer.
        code: RDKafkaErrorCode,
    },
}

/// Creates the topics that do not exist yet; returns the names created.
pub async fn create(
    admin_config: &rdkafka::ClientConfig,
    specs: &[TopicSpec],
    replication: i32,
) -> Result<Vec<String>, TopicError> {
    let admin: AdminClient<DefaultClientContext> = admin_config.create()?;
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            s.configs.iter().fold(
                NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(replication)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut created = Vec::new();
    for r in admin.create_topics(&new, &opts).await? {
        match r {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Create { topic, code }),
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_topics_are_compacted_and_refused_records_expire() {
        let policy =
            crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "excedo.toml")
                .unwrap();
        let cfg = super::super::config::parse(
            "[kafka]\nbrokers = \"b:9092\"\ntransactional_id = \"t\"\n[processing]\npolicy = \"p\"\nkey_file = \"k\"\n",
            "c.toml",
            std::path::Path::new("."),
            Vec::new(),
        )
        .unwrap()
        .with_policy(&policy)
        .unwrap();
        let specs = specs(&cfg, &policy, 12);
        let find = |name: &str| specs.iter().find(|s| s.name == name).unwrap();
        assert_eq!(
            find("subscriber.control").configs,
            [("cleanup.policy", "compact")]
        );
        assert_eq!(
            find("cdr.retention.schedule").configs,
            [
                ("cleanup.policy", "compact"),
                ("min.compaction.lag.ms", "3600000")
            ]
        );
        assert_eq!(find("cdr.retention").role, "retention-expiry events");
        assert_eq!(
            find("cdr.retention.schedule").partitions,
            12,
            "one schedule partition per input partition"
        );
        assert_eq!(
            find("cdr.dead-letter").configs,
            [("retention.ms", "604800000")]
        );
        // One topic per declared route, none for customer care (not declared by Excedo).
        let routes: Vec<&str> = specs
            .iter()
            .filter(|s| {
                s.name.starts_with("cdr.")
                    && s.configs.is_empty()
                    && !["cdr.raw", "cdr.retention"].contains(&s.name.as_str())
            })
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            routes,
            [
                "cdr.billing",
                "cdr.fraud",
                "cdr.analytics",
                "cdr.marketing",
                "cdr.troubleshooting"
            ]
        );
    }
}
