//! Configuration: DescribeConfigs, AlterConfigs and IncrementalAlterConfigs for topics, and
//! a read-only view of the broker's own settings.

use std::collections::BTreeMap;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse as IncrementalResponse;
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
};
use sluice_broker::ConfigKind;

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

fn broker_entries(ctx: &Context) -> Vec<(&'static str, String, ConfigKind)> {
    let config = ctx.broker.config();
    let log = &config.log_defaults;
    vec![
        ("broker.id", config.node_id.to_string(), ConfigKind::Int),
        (
            "log.dirs",
            config.data_dir.display().to_string(),
            ConfigKind::String,
        ),
        (
            "num.partitions",
            config.default_partition_count.to_string(),
            ConfigKind::Int,
        ),
        (
            "auto.create.topics.enable",
            config.auto_create_topics.to_string(),
            ConfigKind::Boolean,
        ),
        (
            "log.retention.ms",
            log.retention_ms.unwrap_or(-1).to_string(),
            ConfigKind::Long,
        ),
        (
            "log.retention.bytes",
            log.retention_bytes.map_or(-1, |b| b as i64).to_string(),
            ConfigKind::Long,
        ),
        (
            "log.segment.bytes",
            log.segment_bytes.to_string(),
            ConfigKind::Int,
        ),
        ("log.roll.ms", log.segment_ms.to_string(), ConfigKind::Long),
        (
            "log.index.interval.bytes",
            log.index_interval_bytes.to_string(),
            ConfigKind::Int,
        ),
        (
            "message.max.bytes",
            log.max_batch_bytes.to_string(),
            ConfigKind::Int,
        ),
        ("sluice.fsync", log.fsync.to_string(), ConfigKind::String),
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
            let result = DescribeConfigsResult::default()
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
                            .filter(|(key, _, _)| wanted(&resource.configuration_keys, key))
                            .map(|(key, value, kind)| {
                                DescribeConfigsResourceResult::default()
                                    .with_name(text(key))
                                    .with_value(Some(text(value)))
                                    .with_read_only(true)
                                    .with_config_source(SOURCE_STATIC_BROKER)
                                    .with_config_type(type_code(kind))
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
