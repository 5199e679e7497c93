//! Every API the broker advertises in ApiVersions, sent at the highest version it advertises,
//! over a real socket to the real front-end: each must come back as a response that the codec
//! decodes completely. An advertised version the broker cannot decode or answer shows up here
//! as a closed connection or an undecodable answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use sluice_broker::{Broker, BrokerConfig, Supervisor};
use sluice_kafka::{KafkaFrontend, KafkaSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A request of `api` that the broker can act on without anything existing beforehand.
fn request_for(api: ApiKey) -> RequestKind {
    match api {
        // acks=0 would get no answer at all.
        ApiKey::Produce => RequestKind::Produce(ProduceRequest::default().with_acks(-1)),
        ApiKey::Fetch => RequestKind::Fetch(FetchRequest::default().with_max_wait_ms(0)),
        ApiKey::ListOffsets => RequestKind::ListOffsets(ListOffsetsRequest::default()),
        ApiKey::Metadata => RequestKind::Metadata(MetadataRequest::default()),
        ApiKey::OffsetCommit => RequestKind::OffsetCommit(OffsetCommitRequest::default()),
        ApiKey::OffsetFetch => RequestKind::OffsetFetch(OffsetFetchRequest::default()),
        ApiKey::FindCoordinator => RequestKind::FindCoordinator(FindCoordinatorRequest::default()),
        ApiKey::JoinGroup => RequestKind::JoinGroup(JoinGroupRequest::default()),
        ApiKey::Heartbeat => RequestKind::Heartbeat(HeartbeatRequest::default()),
        ApiKey::LeaveGroup => RequestKind::LeaveGroup(LeaveGroupRequest::default()),
        ApiKey::SyncGroup => RequestKind::SyncGroup(SyncGroupRequest::default()),
        ApiKey::DescribeGroups => RequestKind::DescribeGroups(DescribeGroupsRequest::default()),
        ApiKey::ListGroups => RequestKind::ListGroups(ListGroupsRequest::default()),
        ApiKey::ApiVersions => RequestKind::ApiVersions(
            ApiVersionsRequest::default()
                .with_client_software_name(StrBytes::from_static_str("every-api"))
                .with_client_software_version(StrBytes::from_static_str("1")),
        ),
        ApiKey::CreateTopics => RequestKind::CreateTopics(CreateTopicsRequest::default()),
        ApiKey::DeleteTopics => RequestKind::DeleteTopics(DeleteTopicsRequest::default()),
        ApiKey::DeleteRecords => RequestKind::DeleteRecords(DeleteRecordsRequest::default()),
        ApiKey::InitProducerId => RequestKind::InitProducerId(
            InitProducerIdRequest::default()
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        ),
        ApiKey::OffsetForLeaderEpoch => {
            RequestKind::OffsetForLeaderEpoch(OffsetForLeaderEpochRequest::default())
        }
        ApiKey::DescribeConfigs => RequestKind::DescribeConfigs(DescribeConfigsRequest::default()),
        ApiKey::AlterConfigs => RequestKind::AlterConfigs(AlterConfigsRequest::default()),
        ApiKey::CreatePartitions => {
            RequestKind::CreatePartitions(CreatePartitionsRequest::default())
        }
        ApiKey::IncrementalAlterConfigs => {
            RequestKind::IncrementalAlterConfigs(IncrementalAlterConfigsRequest::default())
        }
        ApiKey::DeleteGroups => RequestKind::DeleteGroups(DeleteGroupsRequest::default()),
        ApiKey::DescribeCluster => RequestKind::DescribeCluster(DescribeClusterRequest::default()),
        ApiKey::DescribeQuorum => RequestKind::DescribeQuorum(DescribeQuorumRequest::default()),
        ApiKey::ListConfigResources => {
            RequestKind::ListConfigResources(ListConfigResourcesRequest::default())
        }
        ApiKey::DescribeTopicPartitions => RequestKind::DescribeTopicPartitions(
            DescribeTopicPartitionsRequest::default().with_response_partition_limit(10),
        ),
        ApiKey::ElectLeaders => RequestKind::ElectLeaders(ElectLeadersRequest::default()),
        ApiKey::DescribeLogDirs => RequestKind::DescribeLogDirs(DescribeLogDirsRequest::default()),
        ApiKey::AlterReplicaLogDirs => {
            RequestKind::AlterReplicaLogDirs(AlterReplicaLogDirsRequest::default())
        }
        ApiKey::ListPartitionReassignments => {
            RequestKind::ListPartitionReassignments(ListPartitionReassignmentsRequest::default())
        }
        ApiKey::AlterPartitionReassignments => {
            RequestKind::AlterPartitionReassignments(AlterPartitionReassignmentsRequest::default())
        }
        other => panic!("{other:?} is advertised but this test has no request for it: add one"),
    }
}

async fn roundtrip(
    stream: &mut TcpStream,
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    request: &RequestKind,
) -> ResponseKind {
    let mut frame = BytesMut::new();
    frame.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("every-api")))
        .encode(&mut frame, api.request_header_version(version))
        .unwrap();
    request.encode(&mut frame, version).unwrap();
    let size = (frame.len() - 4) as i32;
    frame[..4].copy_from_slice(&size.to_be_bytes());
    stream.write_all(&frame).await.unwrap();

    let size = tokio::time::timeout(Duration::from_secs(10), stream.read_i32())
        .await
        .unwrap_or_else(|_| panic!("no answer to {api:?} v{version}"))
        .unwrap_or_else(|e| panic!("{api:?} v{version}: connection closed ({e})"));
    let mut body = vec![0u8; size as usize];
    stream.read_exact(&mut body).await.unwrap();
    let mut body = Bytes::from(body);
    let header = ResponseHeader::decode(&mut body, api.response_header_version(version))
        .unwrap_or_else(|e| panic!("{api:?} v{version}: response header: {e}"));
    assert_eq!(header.correlation_id, correlation_id, "{api:?} v{version}");
    let response = ResponseKind::decode(api, &mut body, version)
        .unwrap_or_else(|e| panic!("{api:?} v{version}: response body: {e}"));
    assert!(
        !body.has_remaining(),
        "{api:?} v{version}: {} bytes left after the response",
        body.remaining()
    );
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_advertised_api_answers_at_its_highest_advertised_version() {
    let dir = tempfile::tempdir().unwrap();
    let (supervisor, _fatal) = Supervisor::new();
    let broker = Broker::open(
        BrokerConfig::new(dir.path()),
        Arc::new(sluice_storage::SystemClock),
        supervisor,
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let settings = KafkaSettings {
        advertised_host: address.ip().to_string(),
        advertised_port: address.port(),
        max_request_bytes: 1 << 20,
        max_connections: 16,
        ..KafkaSettings::default()
    };
    let server = tokio::spawn(sluice_kafka::serve(
        listener,
        broker.clone(),
        settings,
        Arc::new(KafkaFrontend::default()),
        shutdown.clone(),
        tracker.clone(),
    ));

    let mut stream = TcpStream::connect(address).await.unwrap();
    let versions = ApiKey::ApiVersions;
    let advertised = match roundtrip(&mut stream, versions, 3, 1, &request_for(versions)).await {
        ResponseKind::ApiVersions(response) => response,
        other => panic!("ApiVersions answered with {other:?}"),
    };
    assert_eq!(advertised.error_code, 0);
    assert!(advertised.api_keys.len() > 20);
    for (index, entry) in advertised.api_keys.iter().enumerate() {
        let api = ApiKey::try_from(entry.api_key).expect("a known API key");
        let request = request_for(api);
        roundtrip(
            &mut stream,
            api,
            entry.max_version,
            100 + index as i32,
            &request,
        )
        .await;
    }

    shutdown.cancel();
    server.await.unwrap();
    tracker.close();
    tracker.wait().await;
    broker.shutdown().await.unwrap();
}
