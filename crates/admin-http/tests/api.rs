//! The admin API against a real broker core: every endpoint, bad input, authentication, and
//! the OpenAPI document checked against the routes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode, header};
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sluice_admin::{AdminState, app, openapi_document};
use sluice_broker::users::Permission;
use sluice_broker::{Broker, BrokerConfig, CommittedOffset, OffsetEntry, Supervisor};
use sluice_kafka::KafkaFrontend;
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    state: Arc<AdminState>,
    app: Router,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (supervisor, _fatal) = Supervisor::new();
    let broker = Broker::open(
        BrokerConfig::new(dir.path()),
        Arc::new(sluice_storage::SystemClock),
        supervisor,
    )
    .await
    .unwrap();
    let everything: BTreeMap<String, Permission> = [("/".to_owned(), Permission::all())].into();
    broker.ensure_vhost("/").await.unwrap();
    broker
        .ensure_user(
            "admin",
            "secret",
            vec!["administrator".into()],
            everything.clone(),
        )
        .await
        .unwrap();
    broker
        .ensure_user(
            "viewer",
            "look",
            vec!["monitoring".into()],
            everything.clone(),
        )
        .await
        .unwrap();
    broker
        .ensure_user("nobody", "nothing", vec![], everything.clone())
        .await
        .unwrap();
    broker
        .ensure_user("guest", "guest", vec!["administrator".into()], everything)
        .await
        .unwrap();
    let state = AdminState::new(
        broker,
        Arc::new(KafkaFrontend::default()),
        Arc::default(),
        BTreeMap::new(),
    );
    let app = app(Arc::clone(&state));
    Fixture {
        _dir: dir,
        state,
        app,
    }
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
    text: String,
}

async fn call(
    app: &Router,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
    peer: &str,
) -> Reply {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(auth) = auth {
        request = request.header(header::AUTHORIZATION, auth);
    }
    let body = match body {
        Some(json) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(json.to_string())
        }
        None => Body::empty(),
    };
    let mut request = request.body(body).unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
        text,
    }
}

const LOCAL: &str = "127.0.0.1:40000";

async fn admin(app: &Router, method: Method, path: &str, body: Option<Value>) -> Reply {
    call(
        app,
        method,
        path,
        Some(&basic("admin", "secret")),
        body,
        LOCAL,
    )
    .await
}

fn assert_problem(reply: &Reply, status: StatusCode, detail_contains: &str) {
    assert_eq!(reply.status, status, "{}", reply.text);
    assert_eq!(
        reply.headers[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert_eq!(reply.body["status"], status.as_u16());
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(
        detail.contains(detail_contains),
        "detail {detail:?} lacks {detail_contains:?}"
    );
}

#[tokio::test]
async fn health_and_readiness_need_no_login() {
    let f = fixture().await;
    assert_eq!(
        call(&f.app, Method::GET, "/healthz", None, None, LOCAL)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        call(&f.app, Method::GET, "/readyz", None, None, LOCAL)
            .await
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    f.state.set_ready(true);
    assert_eq!(
        call(&f.app, Method::GET, "/readyz", None, None, LOCAL)
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn authentication_and_tags_are_enforced() {
    let f = fixture().await;
    let anonymous = call(&f.app, Method::GET, "/api/topics", None, None, LOCAL).await;
    assert_problem(
        &anonymous,
        StatusCode::UNAUTHORIZED,
        "user name and password",
    );
    assert!(anonymous.headers.contains_key(header::WWW_AUTHENTICATE));
    let wrong = call(
        &f.app,
        Method::GET,
        "/api/topics",
        Some(&basic("admin", "nope")),
        None,
        LOCAL,
    )
    .await;
    assert_problem(&wrong, StatusCode::UNAUTHORIZED, "wrong");
    // guest only from loopback, as RabbitMQ does.
    let remote_guest = call(
        &f.app,
        Method::GET,
        "/api/topics",
        Some(&basic("guest", "guest")),
        None,
        "10.1.2.3:5000",
    )
    .await;
    assert_problem(&remote_guest, StatusCode::UNAUTHORIZED, "localhost");
    assert_eq!(
        call(
            &f.app,
            Method::GET,
            "/api/topics",
            Some(&basic("guest", "guest")),
            None,
            LOCAL
        )
        .await
        .status,
        StatusCode::OK
    );
    // A monitoring user reads but cannot change; a user without tags cannot use the API.
    let viewer = Some(basic("viewer", "look"));
    assert_eq!(
        call(
            &f.app,
            Method::GET,
            "/api/topics",
            viewer.as_deref(),
            None,
            LOCAL
        )
        .await
        .status,
        StatusCode::OK
    );
    let denied = call(
        &f.app,
        Method::POST,
        "/api/topics",
        viewer.as_deref(),
        Some(json!({"name": "x"})),
        LOCAL,
    )
    .await;
    assert_problem(&denied, StatusCode::FORBIDDEN, "administrator");
    let untagged = call(
        &f.app,
        Method::GET,
        "/api/overview",
        Some(&basic("nobody", "nothing")),
        None,
        LOCAL,
    )
    .await;
    assert_problem(&untagged, StatusCode::FORBIDDEN, "tags");
}

#[tokio::test]
async fn topics_lifecycle_with_bad_input() {
    let f = fixture().await;
    let bad = admin(
        &f.app,
        Method::POST,
        "/api/topics",
        Some(json!({"name": "no spaces allowed"})),
    )
    .await;
    assert_problem(
        &bad,
        StatusCode::BAD_REQUEST,
        "character ' ' is not allowed",
    );
    let created = admin(
        &f.app,
        Method::POST,
        "/api/topics",
        Some(json!({"name": "orders", "partitions": 3, "config": {"retention.ms": "60000"}})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(created.body["partitions"].as_array().unwrap().len(), 3);
    let again = admin(
        &f.app,
        Method::POST,
        "/api/topics",
        Some(json!({"name": "orders"})),
    )
    .await;
    assert_problem(&again, StatusCode::CONFLICT, "already exists");
    let bad_config = admin(
        &f.app,
        Method::POST,
        "/api/topics",
        Some(json!({"name": "x", "config": {"retention.ms": "soon"}})),
    )
    .await;
    assert_problem(&bad_config, StatusCode::BAD_REQUEST, "retention.ms");

    let listed = admin(&f.app, Method::GET, "/api/topics", None).await;
    assert_eq!(listed.body[0]["name"], "orders");
    let missing = admin(&f.app, Method::GET, "/api/topics/nope", None).await;
    assert_problem(&missing, StatusCode::NOT_FOUND, "does not exist");

    let altered = admin(
        &f.app,
        Method::PATCH,
        "/api/topics/orders/config",
        Some(json!({"retention.ms": null, "segment.ms": "3600000"})),
    )
    .await;
    assert_eq!(altered.status, StatusCode::OK, "{}", altered.text);
    let config: BTreeMap<String, Value> = altered.body["config"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_owned(), c.clone()))
        .collect();
    assert_eq!(config["segment.ms"]["value"], "3600000");
    assert_eq!(config["segment.ms"]["is_default"], false);
    assert_eq!(config["retention.ms"]["is_default"], true);
    let bad_alter = admin(
        &f.app,
        Method::PATCH,
        "/api/topics/orders/config",
        Some(json!({"no.such.key": "1"})),
    )
    .await;
    assert_problem(&bad_alter, StatusCode::BAD_REQUEST, "no.such.key");

    let shrink = admin(
        &f.app,
        Method::POST,
        "/api/topics/orders/partitions",
        Some(json!({"count": 2})),
    )
    .await;
    assert_problem(&shrink, StatusCode::BAD_REQUEST, "must be larger");
    let grown = admin(
        &f.app,
        Method::POST,
        "/api/topics/orders/partitions",
        Some(json!({"count": 5})),
    )
    .await;
    assert_eq!(grown.body["partitions"].as_array().unwrap().len(), 5);

    let malformed = call(
        &f.app,
        Method::POST,
        "/api/topics",
        Some(&basic("admin", "secret")),
        Some(json!({"partitions": "many"})),
        LOCAL,
    )
    .await;
    assert!(malformed.status.is_client_error());

    assert_eq!(
        admin(&f.app, Method::DELETE, "/api/topics/orders", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &admin(&f.app, Method::DELETE, "/api/topics/orders", None).await,
        StatusCode::NOT_FOUND,
        "does not exist",
    );
}

#[tokio::test]
async fn publish_peek_metrics_and_overview() {
    let f = fixture().await;
    admin(
        &f.app,
        Method::POST,
        "/api/topics",
        Some(json!({"name": "events", "partitions": 2})),
    )
    .await;
    for i in 0..5 {
        let published = admin(&f.app, Method::POST, "/api/topics/events/messages", Some(json!({"partition": 1, "key": format!("k{i}"), "value": format!("hello {i}"), "headers": {"h": "v"}}))).await;
        assert_eq!(published.status, StatusCode::OK, "{}", published.text);
        assert_eq!(published.body["offset"], i);
    }
    let binary = admin(
        &f.app,
        Method::POST,
        "/api/topics/events/messages",
        Some(json!({"partition": 0, "value": "AAEC/w==", "encoding": "base64"})),
    )
    .await;
    assert_eq!(binary.status, StatusCode::OK);
    let wrong_partition = admin(
        &f.app,
        Method::POST,
        "/api/topics/events/messages",
        Some(json!({"partition": 7, "value": "x"})),
    )
    .await;
    assert_problem(
        &wrong_partition,
        StatusCode::BAD_REQUEST,
        "partitions 0 to 1",
    );
    let bad_base64 = admin(
        &f.app,
        Method::POST,
        "/api/topics/events/messages",
        Some(json!({"value": "%%%", "encoding": "base64"})),
    )
    .await;
    assert_problem(&bad_base64, StatusCode::BAD_REQUEST, "base64");

    let peek = admin(
        &f.app,
        Method::GET,
        "/api/topics/events/messages?partition=1&offset=2&limit=2",
        None,
    )
    .await;
    let messages = peek.body.as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["offset"], 2);
    assert_eq!(messages[0]["key"], "k2");
    assert_eq!(messages[0]["value"], "hello 2");
    assert_eq!(messages[0]["headers"]["h"], "v");
    let newest = admin(
        &f.app,
        Method::GET,
        "/api/topics/events/messages?limit=3",
        None,
    )
    .await;
    assert_eq!(newest.body.as_array().unwrap().len(), 3);
    let raw = admin(
        &f.app,
        Method::GET,
        "/api/topics/events/messages?partition=0",
        None,
    )
    .await;
    assert_eq!(raw.body[0]["value"], Value::Null);
    assert_eq!(raw.body[0]["value_base64"], "AAEC/w==");

    let metrics = call(&f.app, Method::GET, "/metrics", None, None, LOCAL).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics
            .text
            .contains("sluice_partition_records_in_total{topic=\"events\",partition=\"1\"} 5\n"),
        "{}",
        metrics.text
    );
    assert!(
        metrics
            .text
            .contains("sluice_partition_records_out_total{topic=\"events\",partition=\"1\"} ")
    );
    assert!(
        metrics
            .text
            .contains("# TYPE sluice_fsync_duration_seconds histogram")
    );

    let overview = admin(&f.app, Method::GET, "/api/overview", None).await;
    assert_eq!(overview.body["totals"]["topics"], 1);
    assert_eq!(overview.body["totals"]["records"], 6);
}

#[tokio::test]
async fn groups_show_lag_and_reset_offsets() {
    let f = fixture().await;
    admin(
        &f.app,
        Method::POST,
        "/api/topics",
        Some(json!({"name": "t", "partitions": 1})),
    )
    .await;
    for i in 0..10 {
        admin(
            &f.app,
            Method::POST,
            "/api/topics/t/messages",
            Some(json!({"value": format!("{i}")})),
        )
        .await;
    }
    let broker = &f.state.broker;
    broker
        .commit_offsets(
            "g",
            vec![OffsetEntry {
                topic: "t".into(),
                partition: 0,
                committed: CommittedOffset {
                    offset: 4,
                    leader_epoch: -1,
                    metadata: String::new(),
                    commit_timestamp_ms: 0,
                },
            }],
        )
        .await
        .unwrap();
    let listed = admin(&f.app, Method::GET, "/api/groups", None).await;
    assert_eq!(listed.body[0]["group_id"], "g");
    assert_eq!(listed.body[0]["lag"], 6);
    let described = admin(&f.app, Method::GET, "/api/groups/g", None).await;
    assert_eq!(described.body["offsets"][0]["committed"], 4);
    assert_eq!(described.body["offsets"][0]["high_watermark"], 10);
    assert_eq!(described.body["offsets"][0]["lag"], 6);
    assert_problem(
        &admin(&f.app, Method::GET, "/api/groups/none", None).await,
        StatusCode::NOT_FOUND,
        "does not exist",
    );

    let dry = admin(
        &f.app,
        Method::POST,
        "/api/groups/g/reset-offsets",
        Some(json!({"to": "earliest", "dry_run": true})),
    )
    .await;
    assert_eq!(dry.body[0]["previous"], 4);
    assert_eq!(dry.body[0]["new"], 0);
    assert_eq!(
        broker
            .committed_offset("g", "t", 0)
            .unwrap()
            .unwrap()
            .offset,
        4,
        "a dry run commits nothing"
    );
    let latest = admin(
        &f.app,
        Method::POST,
        "/api/groups/g/reset-offsets",
        Some(json!({"to": "latest"})),
    )
    .await;
    assert_eq!(latest.body[0]["new"], 10);
    assert_eq!(
        broker
            .committed_offset("g", "t", 0)
            .unwrap()
            .unwrap()
            .offset,
        10
    );
    let exact = admin(
        &f.app,
        Method::POST,
        "/api/groups/g/reset-offsets",
        Some(json!({"to": "offset", "offset": 7, "topic": "t"})),
    )
    .await;
    assert_eq!(exact.body[0]["new"], 7);
    let by_time = admin(
        &f.app,
        Method::POST,
        "/api/groups/g/reset-offsets",
        Some(json!({"to": "timestamp", "timestamp_ms": 0})),
    )
    .await;
    assert_eq!(by_time.body[0]["new"], 0);
    let bad_target = admin(
        &f.app,
        Method::POST,
        "/api/groups/g/reset-offsets",
        Some(json!({"to": "sideways"})),
    )
    .await;
    assert!(bad_target.status.is_client_error());
    let unknown_topic = admin(
        &f.app,
        Method::POST,
        "/api/groups/g/reset-offsets",
        Some(json!({"to": "earliest", "topic": "zz"})),
    )
    .await;
    assert_problem(&unknown_topic, StatusCode::NOT_FOUND, "zz");

    assert_eq!(
        admin(&f.app, Method::DELETE, "/api/groups/g", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        admin(&f.app, Method::DELETE, "/api/groups/g", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn connections_list_and_unknown_close() {
    let f = fixture().await;
    let listed = admin(&f.app, Method::GET, "/api/connections", None).await;
    assert_eq!(listed.body, json!([]));
    assert_problem(
        &admin(&f.app, Method::DELETE, "/api/connections/kafka-99", None).await,
        StatusCode::NOT_FOUND,
        "kafka-99",
    );
    assert_problem(
        &admin(&f.app, Method::DELETE, "/api/connections/bogus", None).await,
        StatusCode::NOT_FOUND,
        "bogus",
    );
}

#[tokio::test]
async fn queues_declare_list_publish_peek_purge_delete() {
    let f = fixture().await;
    let app = &f.app;
    let declared = admin(
        app,
        Method::PUT,
        "/api/queues/%2F/jobs",
        Some(json!({"arguments": {"x-max-length": 100}})),
    )
    .await;
    assert_eq!(declared.status, StatusCode::CREATED, "{}", declared.text);
    assert_eq!(declared.body["durable"], true);
    assert_eq!(declared.body["arguments"]["x-max-length"], 100);
    let again = admin(
        app,
        Method::PUT,
        "/api/queues/%2F/jobs",
        Some(json!({"arguments": {"x-max-length": 100}})),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_problem(
        &admin(
            app,
            Method::PUT,
            "/api/queues/%2F/jobs",
            Some(json!({"durable": false})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "inequivalent arg 'durable'",
    );
    assert_problem(
        &admin(
            app,
            Method::PUT,
            "/api/queues/%2F/bad",
            Some(json!({"arguments": {"x-max-length": "many"}})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "x-max-length",
    );
    assert_problem(
        &admin(app, Method::PUT, "/api/queues/%2F/amq.mine", None).await,
        StatusCode::FORBIDDEN,
        "reserved prefix",
    );
    assert_problem(
        &admin(app, Method::PUT, "/api/queues/nowhere/jobs", None).await,
        StatusCode::NOT_FOUND,
        "nowhere",
    );
    assert_problem(
        &admin(
            app,
            Method::PUT,
            "/api/queues/%2F/jobs",
            Some(json!({"colour": "red"})),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "colour",
    );

    for i in 0..3 {
        let published = admin(
            app,
            Method::POST,
            "/api/exchanges/%2F/amq.default/publish",
            Some(json!({"routing_key": "jobs", "payload": format!("job {i}"),
                        "properties": {"delivery_mode": 2, "headers": {"n": i}}})),
        )
        .await;
        assert_eq!(
            published.body,
            json!({"routed": true, "queues": 1}),
            "{}",
            published.text
        );
    }
    let unrouted = admin(
        app,
        Method::POST,
        "/api/exchanges/%2F/amq.direct/publish",
        Some(json!({"routing_key": "nobody", "payload": "x"})),
    )
    .await;
    assert_eq!(unrouted.body, json!({"routed": false, "queues": 0}));
    assert_problem(
        &admin(
            app,
            Method::POST,
            "/api/exchanges/%2F/amq.default/publish",
            Some(json!({"routing_key": "jobs", "payload": "x", "properties": {"priority": 900}})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "priority",
    );
    assert_problem(
        &admin(
            app,
            Method::POST,
            "/api/exchanges/%2F/missing/publish",
            Some(json!({"payload": "x"})),
        )
        .await,
        StatusCode::NOT_FOUND,
        "missing",
    );

    let queue = admin(app, Method::GET, "/api/queues/%2F/jobs", None).await;
    assert_eq!(queue.body["messages_ready"], 3);
    assert_eq!(queue.body["published"], 3);
    let peeked = admin(
        app,
        Method::POST,
        "/api/queues/%2F/jobs/get",
        Some(json!({"count": 2})),
    )
    .await;
    let payloads: Vec<&str> = peeked
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].as_str().unwrap())
        .collect();
    assert_eq!(payloads, ["job 0", "job 1"]);
    assert_eq!(peeked.body[0]["properties"]["headers"]["n"], 0);
    assert_eq!(peeked.body[0]["properties"]["delivery_mode"], 2);
    // Peeking leaves them in the queue.
    let queue = admin(app, Method::GET, "/api/queues/%2F/jobs", None).await;
    assert_eq!(queue.body["messages_ready"], 3);
    let taken = admin(
        app,
        Method::POST,
        "/api/queues/%2F/jobs/get",
        Some(json!({"count": 1, "requeue": false})),
    )
    .await;
    assert_eq!(taken.body[0]["payload"], "job 0");
    assert_eq!(taken.body[0]["redelivered"], true);
    assert_problem(
        &admin(
            app,
            Method::POST,
            "/api/queues/%2F/jobs/get",
            Some(json!({"count": 0})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "count",
    );

    let listed = admin(app, Method::GET, "/api/queues", None).await;
    let names: Vec<&str> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["jobs"]);
    let vhosts = admin(app, Method::GET, "/api/vhosts", None).await;
    assert_eq!(vhosts.body[0]["name"], "/");
    assert_eq!(vhosts.body[0]["messages_ready"], 2);

    let metrics = call(app, Method::GET, "/metrics", None, None, LOCAL)
        .await
        .text;
    assert!(
        metrics.contains("sluice_queue_messages_ready{vhost=\"/\",queue=\"jobs\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_queue_published_total{vhost=\"/\",queue=\"jobs\"} 3"));
    assert!(metrics.contains("sluice_alarm{resource=\"disk\"} 0"));

    let purged = admin(app, Method::DELETE, "/api/queues/%2F/jobs/contents", None).await;
    assert_eq!(purged.body, json!({"messages": 2}));
    assert_problem(
        &admin(app, Method::DELETE, "/api/queues/%2F/nope", None).await,
        StatusCode::NOT_FOUND,
        "nope",
    );
    assert_eq!(
        admin(app, Method::DELETE, "/api/queues/%2F/jobs", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        admin(app, Method::GET, "/api/queues/%2F/jobs", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn exchanges_and_bindings_route_messages() {
    let f = fixture().await;
    let app = &f.app;
    assert_eq!(
        admin(
            app,
            Method::PUT,
            "/api/exchanges/%2F/logs",
            Some(json!({"type": "topic"}))
        )
        .await
        .status,
        StatusCode::CREATED
    );
    assert_problem(
        &admin(
            app,
            Method::PUT,
            "/api/exchanges/%2F/logs",
            Some(json!({"type": "fanout"})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "inequivalent arg 'type'",
    );
    assert_problem(
        &admin(
            app,
            Method::PUT,
            "/api/exchanges/%2F/odd",
            Some(json!({"type": "sideways"})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "unknown exchange type 'sideways'",
    );
    assert_problem(
        &admin(app, Method::DELETE, "/api/exchanges/%2F/amq.topic", None).await,
        StatusCode::FORBIDDEN,
        "not allowed",
    );
    admin(app, Method::PUT, "/api/queues/%2F/errors", None).await;
    let bound = admin(
        app,
        Method::POST,
        "/api/bindings/%2F",
        Some(json!({"source": "logs", "destination": "errors", "routing_key": "*.error"})),
    )
    .await;
    assert_eq!(bound.status, StatusCode::CREATED, "{}", bound.text);
    assert_problem(
        &admin(
            app,
            Method::POST,
            "/api/bindings/%2F",
            Some(json!({"source": "logs", "destination": "ghost"})),
        )
        .await,
        StatusCode::NOT_FOUND,
        "ghost",
    );
    let bindings = admin(app, Method::GET, "/api/bindings/%2F", None).await;
    assert_eq!(bindings.body.as_array().unwrap().len(), 1);
    assert_eq!(bindings.body[0]["routing_key"], "*.error");
    let exchange = admin(app, Method::GET, "/api/exchanges/%2F/logs", None).await;
    assert_eq!(exchange.body["type"], "topic");
    assert_eq!(exchange.body["bindings"], 1);
    let all = admin(app, Method::GET, "/api/exchanges/%2F", None).await;
    assert!(
        all.body
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "amq.fanout")
    );

    let routed = admin(
        app,
        Method::POST,
        "/api/exchanges/%2F/logs/publish",
        Some(json!({"routing_key": "db.error", "payload": "aGk=", "payload_encoding": "base64"})),
    )
    .await;
    assert_eq!(routed.body["queues"], 1);
    let peeked = admin(
        app,
        Method::POST,
        "/api/queues/%2F/errors/get",
        Some(json!({"count": 5})),
    )
    .await;
    assert_eq!(peeked.body[0]["payload"], "hi");
    assert_eq!(peeked.body[0]["exchange"], "logs");

    let unbind = json!({"source": "logs", "destination": "errors", "routing_key": "*.error"});
    assert_eq!(
        admin(
            app,
            Method::DELETE,
            "/api/bindings/%2F",
            Some(unbind.clone())
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &admin(app, Method::DELETE, "/api/bindings/%2F", Some(unbind)).await,
        StatusCode::NOT_FOUND,
        "no binding",
    );
    assert_eq!(
        admin(app, Method::DELETE, "/api/exchanges/%2F/logs", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &admin(app, Method::DELETE, "/api/exchanges/%2F/logs", None).await,
        StatusCode::NOT_FOUND,
        "logs",
    );
}

#[tokio::test]
async fn users_permissions_and_vhosts() {
    let f = fixture().await;
    let app = &f.app;
    assert_problem(
        &admin(
            app,
            Method::PUT,
            "/api/users/carol",
            Some(json!({"tags": ["management"]})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "needs a password",
    );
    assert_eq!(
        admin(
            app,
            Method::PUT,
            "/api/users/carol",
            Some(json!({"password": "pw", "tags": ["monitoring"]}))
        )
        .await
        .status,
        StatusCode::CREATED
    );
    // Her password works for the API (monitoring may read).
    let as_carol = call(
        app,
        Method::GET,
        "/api/queues",
        Some(&basic("carol", "pw")),
        None,
        LOCAL,
    )
    .await;
    assert_eq!(as_carol.status, StatusCode::OK);
    assert_eq!(
        admin(app, Method::PUT, "/api/vhosts/staging", None)
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        admin(app, Method::PUT, "/api/vhosts/staging", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        admin(
            app,
            Method::PUT,
            "/api/permissions/staging/carol",
            Some(json!({"configure": "^$", "write": ".*", "read": ".*"}))
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &admin(
            app,
            Method::PUT,
            "/api/permissions/staging/carol",
            Some(json!({"configure": "(", "write": ".*", "read": ".*"})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "(",
    );
    assert_problem(
        &admin(
            app,
            Method::PUT,
            "/api/permissions/nowhere/carol",
            Some(json!({"configure": "", "write": "", "read": ""})),
        )
        .await,
        StatusCode::NOT_FOUND,
        "nowhere",
    );
    let permissions = admin(app, Method::GET, "/api/permissions", None).await;
    assert!(
        permissions
            .body
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["user"] == "carol" && p["vhost"] == "staging" && p["configure"] == "^$")
    );
    let carol = admin(app, Method::GET, "/api/users/carol", None).await;
    assert_eq!(
        carol.body,
        json!({"name": "carol", "tags": ["monitoring"], "vhosts": ["staging"]})
    );
    assert!(
        !admin(app, Method::GET, "/api/users", None)
            .await
            .text
            .contains("password")
    );
    assert_eq!(
        admin(app, Method::DELETE, "/api/permissions/staging/carol", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        admin(app, Method::DELETE, "/api/users/carol", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &admin(app, Method::DELETE, "/api/users/carol", None).await,
        StatusCode::NOT_FOUND,
        "carol",
    );
    let gone = call(
        app,
        Method::GET,
        "/api/queues",
        Some(&basic("carol", "pw")),
        None,
        LOCAL,
    )
    .await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        admin(app, Method::DELETE, "/api/vhosts/staging", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let vhosts = admin(app, Method::GET, "/api/vhosts", None).await;
    assert!(
        vhosts
            .body
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "staging")
    );
    assert_problem(
        &admin(app, Method::DELETE, "/api/vhosts/staging", None).await,
        StatusCode::NOT_FOUND,
        "staging",
    );
    assert!(
        admin(app, Method::GET, "/api/channels", None)
            .await
            .body
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// Every operation in the OpenAPI document is served by a route, and every `/api` route the
/// router knows is documented.
#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let f = fixture().await;
    let served = call(&f.app, Method::GET, "/api/openapi.json", None, None, LOCAL).await;
    assert_eq!(served.status, StatusCode::OK);
    let document = openapi_document(&f.state);
    assert_eq!(served.body, serde_json::to_value(&document).unwrap());
    let paths = served.body["paths"].as_object().unwrap();
    assert!(paths.len() >= 12, "only {} paths documented", paths.len());
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{topic}", "t")
                .replace("{group}", "g")
                .replace("{id}", "kafka-1")
                .replace("{vhost}", "%2F")
                .replace("{name}", "n")
                .replace("{user}", "u");
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let reply = admin(&f.app, method.clone(), &concrete, Some(json!({}))).await;
            let unrouted = reply.status == StatusCode::METHOD_NOT_ALLOWED
                || (reply.status == StatusCode::NOT_FOUND
                    && reply.body["detail"] == "no such route");
            assert!(
                !unrouted,
                "{method} {path} is documented but not routed ({})",
                reply.status
            );
        }
    }
    // And nothing under /api answers that is not documented: an undocumented path is unrouted.
    let stray = admin(&f.app, Method::GET, "/api/undocumented", None).await;
    assert_eq!(stray.body["detail"], "no such route");
}
