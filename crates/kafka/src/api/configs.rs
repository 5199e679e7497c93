//! Configuration: DescribeConfigs, AlterConfigs and IncrementalAlterConfigs for topics, and
//! a read-only view of the broker's own settings.

use std::collections::BTreeMap;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse as IncrementalResponse;
use kafka_protocol::messages::list_config_resources_response::ConfigResource;
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse, ListConfigResourcesRequest,
    ListConfigResourcesResponse,
};
use sluice_broker::ConfigKind;
use sluice_broker::FsyncPolicy;

use super::text;
use super::topics::{SOURCE_DEFAULT, SOURCE_TOPIC};
use crate::Context;
use crate::errors::{KafkaError, kafka_error};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Kafka's source for settings from the broker's configuration file.
const SOURCE_STATIC_BROKER: i8 = 4;

/// Kafka's config type codes.
fn type_code(kind: ConfigKind) -> i8 {
    match kind {
        ConfigKind::Boolean => 1,
        ConfigKind::String => 2,
        ConfigKind::Int => 3,
        ConfigKind::Long => 5,
    }
}

fn wanted(keys: &Option<Vec<kafka_protocol::protocol::StrBytes>>, name: &str) -> bool {
    keys.as_ref()
        .is_none_or(|keys| keys.is_empty() || keys.iter().any(|k| k.as_str() == name))
}

/// Kafka's config type codes beyond what topics use.
const TYPE_LIST: i8 = 7;

/// One of the broker's settings as DescribeConfigs reports it: Kafka's key, the value Sluice
/// runs with, Kafka's type code, and what it means.
struct BrokerSetting {
    name: &'static str,
    value: String,
    config_type: i8,
    documentation: &'static str,
}

fn setting(
    name: &'static str,
    value: impl ToString,
    kind: ConfigKind,
    documentation: &'static str,
) -> BrokerSetting {
    BrokerSetting {
        name,
        value: value.to_string(),
        config_type: type_code(kind),
        documentation,
    }
}

/// The broker's settings under Kafka's names, as a Kafka broker lists them (clients and tools
/// read `advertised.listeners`, `num.partitions`, `message.max.bytes` and the group bounds).
/// All are read-only at run time: they come from Sluice's configuration.
fn broker_entries(ctx: &Context) -> Vec<BrokerSetting> {
    use ConfigKind::{Boolean, Int, Long, String};
    let config = ctx.broker.config();
    let log = &config.log_defaults;
    let groups = &config.group_limits;
    let settings = &ctx.settings;
    let advertised = format!(
        "PLAINTEXT://{}:{}",
        settings.advertised_host, settings.advertised_port
    );
    let (flush_messages, flush_ms) = match log.fsync {
        FsyncPolicy::Always => (1, 0),
        FsyncPolicy::Interval { interval_ms } => (i64::MAX, interval_ms as i64),
        FsyncPolicy::Never => (i64::MAX, i64::MAX),
    };
    let default_replication_factor = ctx.broker.default_replication_factor();
    vec![
        setting("broker.id", config.node_id, Int, "This broker's id."),
        setting("node.id", config.node_id, Int, "This broker's id."),
        BrokerSetting {
            name: "advertised.listeners",
            value: advertised,
            config_type: TYPE_LIST,
            documentation: "Where clients are told to connect.",
        },
        BrokerSetting {
            name: "listeners",
            value: format!("PLAINTEXT://{}", settings.listen_address),
            config_type: TYPE_LIST,
            documentation: "The address the Kafka listener is bound to.",
        },
        setting(
            "log.dirs",
            config.data_dir.display(),
            String,
            "The data directory.",
        ),
        setting(
            "num.partitions",
            config.default_partition_count,
            Int,
            "Partitions of a topic created without a count.",
        ),
        setting(
            "default.replication.factor",
            default_replication_factor,
            Int,
            "Replicas of a topic created without a factor (unset: the smaller of 3 and the cluster's nodes).",
        ),
        setting(
            "min.insync.replicas",
            config.min_insync_replicas,
            Int,
            "In-sync replicas an acks=all produce needs, unless its topic sets its own.",
        ),
        setting(
            "replica.lag.time.max.ms",
            config.replica_lag_time_max.as_millis(),
            Long,
            "A follower that has not answered its leader for this long is out of sync.",
        ),
        setting(
            "auto.create.topics.enable",
            config.auto_create_topics,
            Boolean,
            "Create a topic when a client first refers to it.",
        ),
        setting(
            "delete.topic.enable",
            true,
            Boolean,
            "Topics can be deleted.",
        ),
        setting(
            "log.retention.ms",
            log.retention_ms.unwrap_or(-1),
            Long,
            "How long records are kept (-1: forever).",
        ),
        setting(
            "log.retention.bytes",
            log.retention_bytes.map_or(-1, |b| b as i64),
            Long,
            "How many bytes a partition keeps (-1: no limit).",
        ),
        setting(
            "log.segment.bytes",
            log.segment_bytes,
            Int,
            "Size of one segment file.",
        ),
        setting(
            "log.roll.ms",
            log.segment_ms,
            Long,
            "Age after which a segment is rolled.",
        ),
        setting(
            "log.index.interval.bytes",
            log.index_interval_bytes,
            Int,
            "Bytes of log between offset index entries.",
        ),
        setting(
            "log.flush.interval.messages",
            flush_messages,
            Long,
            "Records between fsyncs (1: every produce waits for its fsync).",
        ),
        setting(
            "log.flush.interval.ms",
            flush_ms,
            Long,
            "Most time between fsyncs.",
        ),
        setting(
            "message.max.bytes",
            log.max_batch_bytes,
            Int,
            "Largest record batch accepted.",
        ),
        setting(
            "socket.request.max.bytes",
            settings.max_request_bytes,
            Int,
            "Largest request accepted.",
        ),
        setting(
            "max.connections",
            settings.max_connections,
            Int,
            "Connections served at once.",
        ),
        setting(
            "fetch.max.bytes",
            settings.fetch_max_bytes,
            Int,
            "Most record bytes in one Fetch response.",
        ),
        setting(
            "replica.fetch.max.bytes",
            settings.replica_fetch_max_bytes,
            Int,
            "Most record bytes per partition in a fetch between replicas.",
        ),
        setting(
            "group.min.session.timeout.ms",
            groups.min_session_timeout_ms,
            Int,
            "Shortest session timeout a consumer may ask for.",
        ),
        setting(
            "group.max.session.timeout.ms",
            groups.max_session_timeout_ms,
            Int,
            "Longest session timeout a consumer may ask for.",
        ),
        setting(
            "group.initial.rebalance.delay.ms",
            groups.initial_rebalance_delay_ms,
            Int,
            "How long an empty group waits for more members before its first rebalance.",
        ),
        setting(
            "group.max.size",
            groups.max_group_size,
            Int,
            "Most members in one consumer group.",
        ),
        setting(
            "compression.type",
            "producer",
            String,
            "Batches are stored as the producer compressed them.",
        ),
        setting(
            "sluice.fsync",
            log.fsync,
            String,
            "Sluice's fsync policy: always, never or interval(<ms>ms).",
        ),
    ]
}

pub(crate) fn describe(
    ctx: &Context,
    request: DescribeConfigsRequest,
    version: i16,
) -> DescribeConfigsResponse {
    let documented = version >= 3 && request.include_documentation;
    let results = request
        .resources
        .into_iter()
        .map(|resource| {
            // Kafka sends a null message when there is no error.
            let result = DescribeConfigsResult::default()
                .with_error_message(None)
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name.clone());
            match resource.resource_type {
                RESOURCE_TOPIC => match ctx
                    .broker
                    .describe_topic_config(resource.resource_name.as_str())
                {
                    Ok(entries) => result.with_configs(
                        entries
                            .into_iter()
                            .filter(|entry| wanted(&resource.configuration_keys, entry.name))
                            .map(|entry| {
                                DescribeConfigsResourceResult::default()
                                    .with_name(text(entry.name))
                                    .with_value(Some(text(entry.value)))
                                    .with_config_source(if entry.is_default {
                                        SOURCE_DEFAULT
                                    } else {
                                        SOURCE_TOPIC
                                    })
                                    .with_config_type(type_code(entry.kind))
                                    .with_documentation(
                                        documented.then(|| text(entry.documentation)),
                                    )
                            })
                            .collect(),
                    ),
                    Err(error) => {
                        let error = kafka_error(&error);
                        result
                            .with_error_code(error.code)
                            .with_error_message(Some(text(error.message)))
                    }
                },
                RESOURCE_BROKER => {
                    let name = resource.resource_name.as_str();
                    if !name.is_empty() && name != ctx.broker.node_id().to_string() {
                        return result
                            .with_error_code(ResponseError::InvalidRequest.code())
                            .with_error_message(Some(text(format!("no broker with id {name:?}"))));
                    }
                    result.with_configs(
                        broker_entries(ctx)
                            .into_iter()
                            .filter(|entry| wanted(&resource.configuration_keys, entry.name))
                            .map(|entry| {
                                DescribeConfigsResourceResult::default()
                                    .with_name(text(entry.name))
                                    .with_value(Some(text(entry.value)))
                                    .with_read_only(true)
                                    .with_config_source(SOURCE_STATIC_BROKER)
                                    .with_config_type(entry.config_type)
                                    .with_documentation(
                                        documented.then(|| text(entry.documentation)),
                                    )
                            })
                            .collect(),
                    )
                }
                other => result
                    .with_error_code(ResponseError::InvalidRequest.code())
                    .with_error_message(Some(text(format!(
                        "resource type {other} is not supported"
                    )))),
            }
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}

fn not_topic(resource_type: i8) -> KafkaError {
    if resource_type == RESOURCE_BROKER {
        KafkaError::new(
            ResponseError::InvalidRequest,
            "broker settings are read-only at run time; change them in the configuration file",
        )
    } else {
        KafkaError::new(
            ResponseError::InvalidRequest,
            format!("resource type {resource_type} is not supported"),
        )
    }
}

async fn set_topic(
    ctx: &Context,
    name: &str,
    overrides: BTreeMap<String, String>,
    validate_only: bool,
) -> Result<(), KafkaError> {
    ctx.broker
        .set_topic_config(name, overrides, validate_only)
        .await
        .map_err(|error| kafka_error(&error))
}

/// AlterConfigs: the given set replaces every override of the topic.
pub(crate) async fn alter(ctx: &Context, request: AlterConfigsRequest) -> AlterConfigsResponse {
    let mut responses = Vec::with_capacity(request.resources.len());
    for resource in request.resources {
        let outcome = if resource.resource_type == RESOURCE_TOPIC {
            let overrides = resource
                .configs
                .iter()
                .filter_map(|c| {
                    c.value
                        .as_ref()
                        .map(|v| (c.name.to_string(), v.to_string()))
                })
                .collect();
            set_topic(
                ctx,
                resource.resource_name.as_str(),
                overrides,
                request.validate_only,
            )
            .await
        } else {
            Err(not_topic(resource.resource_type))
        };
        let response = AlterConfigsResourceResponse::default()
            .with_resource_type(resource.resource_type)
            .with_resource_name(resource.resource_name);
        responses.push(match outcome {
            Ok(()) => response,
            Err(error) => response
                .with_error_code(error.code)
                .with_error_message(Some(text(error.message))),
        });
    }
    AlterConfigsResponse::default().with_responses(responses)
}

/// IncrementalAlterConfigs: SET (0) and DELETE (1) change single keys; the rest stay.
pub(crate) async fn incremental_alter(
    ctx: &Context,
    request: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut responses = Vec::with_capacity(request.resources.len());
    for resource in request.resources {
        let name = resource.resource_name.to_string();
        let outcome: Result<(), KafkaError> = async {
            if resource.resource_type != RESOURCE_TOPIC {
                return Err(not_topic(resource.resource_type));
            }
            let topic = ctx.broker.topic(&name).ok_or_else(|| {
                kafka_error(&sluice_broker::BrokerError::UnknownTopic(name.clone()))
            })?;
            let mut overrides = topic.overrides.clone();
            for change in &resource.configs {
                let key = change.name.to_string();
                match change.config_operation {
                    0 => {
                        let value =
                            change
                                .value
                                .as_ref()
                                .map(|v| v.to_string())
                                .ok_or_else(|| {
                                    KafkaError::new(
                                        ResponseError::InvalidConfig,
                                        format!("SET of {key} needs a value"),
                                    )
                                })?;
                        overrides.insert(key, value);
                    }
                    1 => {
                        overrides.remove(&key);
                    }
                    2 | 3 => {
                        return Err(KafkaError::new(
                            ResponseError::InvalidConfig,
                            format!("{key} is not a list; APPEND and SUBTRACT do not apply"),
                        ));
                    }
                    other => {
                        return Err(KafkaError::new(
                            ResponseError::InvalidRequest,
                            format!("unknown config operation {other}"),
                        ));
                    }
                }
            }
            set_topic(ctx, &name, overrides, request.validate_only).await
        }
        .await;
        let response = IncrementalResponse::default()
            .with_resource_type(resource.resource_type)
            .with_resource_name(resource.resource_name);
        responses.push(match outcome {
            Ok(()) => response,
            Err(error) => response
                .with_error_code(error.code)
                .with_error_message(Some(text(error.message))),
        });
    }
    IncrementalAlterConfigsResponse::default().with_responses(responses)
}

/// Kafka's resource types that ListConfigResources can list.
const RESOURCE_BROKER_LOGGER: i8 = 8;
const RESOURCE_CLIENT_METRICS: i8 = 16;
const RESOURCE_GROUP: i8 = 32;

/// ListConfigResources (KIP-1142): the resources that have configurations, of the asked types
/// (every type when none is named). v0 was ListClientMetricsResources and lists client-metrics
/// subscriptions only, of which Sluice has none. Groups have no configurations of their own
/// here, so none is listed.
pub(crate) fn list_resources(
    ctx: &Context,
    request: ListConfigResourcesRequest,
    version: i16,
) -> ListConfigResourcesResponse {
    let types: Vec<i8> = if version == 0 {
        vec![RESOURCE_CLIENT_METRICS]
    } else if request.resource_types.is_empty() {
        vec![RESOURCE_TOPIC, RESOURCE_BROKER]
    } else {
        request.resource_types
    };
    let mut resources = Vec::new();
    for resource_type in types {
        match resource_type {
            RESOURCE_TOPIC => {
                let mut names: Vec<String> = ctx
                    .broker
                    .topics()
                    .iter()
                    .map(|topic| topic.name.to_string())
                    .collect();
                names.sort();
                resources.extend(names.into_iter().map(|name| {
                    ConfigResource::default()
                        .with_resource_name(text(name))
                        .with_resource_type(RESOURCE_TOPIC)
                }));
            }
            RESOURCE_BROKER | RESOURCE_BROKER_LOGGER => resources.push(
                ConfigResource::default()
                    .with_resource_name(text(ctx.broker.node_id().to_string()))
                    .with_resource_type(resource_type),
            ),
            RESOURCE_CLIENT_METRICS | RESOURCE_GROUP => {}
            _ => {
                return ListConfigResourcesResponse::default()
                    .with_error_code(ResponseError::UnsupportedVersion.code());
            }
        }
    }
    ListConfigResourcesResponse::default().with_config_resources(resources)
}
