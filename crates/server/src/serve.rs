//! `sluice serve`: start the broker, its listeners, and wait for a signal or a fatal error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_broker::{Broker, Supervisor};
use sluice_cluster::cluster::{Cluster, ClusterSettings, NodeIdentity, PartitionTiming};
use sluice_cluster::node::ControllerSettings;
use sluice_storage::SystemClock;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// Exit status when a core task died (EX_SOFTWARE).
const EXIT_CORE_TASK_DIED: u8 = 70;
/// Exit status when the broker could not start.
const EXIT_STARTUP: u8 = 1;

pub fn run(config: Config, ready_file: Option<PathBuf>) -> ExitCode {
    init_tracing(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime_threads())
        .enable_all()
        .thread_name("sluice")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::from(EXIT_STARTUP);
        }
    };
    let code = runtime.block_on(serve(config, ready_file));
    // Blocking fsync tasks may still be parked; do not wait for them forever.
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

fn init_tracing(config: &Config) {
    // The consensus library reports every election and membership step at info, and warns of
    // every heartbeat to a peer that is down (ten a second, for every group: with replicated
    // partitions, thousands), so only its errors are logged unless an operator asks for more;
    // Sluice logs what matters of peers and leaders itself.
    let level = if config.log.level.contains("openraft") {
        config.log.level.clone()
    } else {
        format!("{},openraft=error", config.log.level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Listeners bound before anything is announced, so the ready file carries real ports.
struct Bound {
    addresses: BTreeMap<&'static str, String>,
    admin: Option<Arc<sluice_admin::AdminState>>,
}

/// Every listener, bound but not served yet.
struct Listeners {
    kafka: Option<(TcpListener, SocketAddr)>,
    amqp: Option<(TcpListener, SocketAddr)>,
    http: Option<(TcpListener, SocketAddr)>,
    /// Taken when the cluster starts; the address stays.
    cluster: Option<TcpListener>,
    cluster_local: SocketAddr,
}

/// The directory under the data directory that holds the node's identity and its controller.
fn cluster_dir(config: &Config) -> PathBuf {
    config.data_dir.join("cluster")
}

async fn serve(config: Config, ready_file: Option<PathBuf>) -> ExitCode {
    let (supervisor, mut fatal) = Supervisor::new();
    let mut broker_config = match config.broker_config() {
        Ok(broker_config) => broker_config,
        Err(error) => {
            tracing::error!("{error:#}");
            return ExitCode::from(EXIT_STARTUP);
        }
    };
    // The node's id is its broker id too.
    let identity = {
        let dir = cluster_dir(&config);
        tokio::task::spawn_blocking(move || NodeIdentity::load_or_create(&dir)).await
    };
    match identity {
        Ok(Ok(identity)) => broker_config.node_id = identity.node_id as u32,
        Ok(Err(error)) => {
            tracing::error!(%error, "cannot read or create this node's identity");
            return ExitCode::from(EXIT_STARTUP);
        }
        Err(error) => {
            tracing::error!(%error, "cannot read this node's identity");
            return ExitCode::from(EXIT_STARTUP);
        }
    }
    let broker = match Broker::open(broker_config, Arc::new(SystemClock), supervisor.clone()).await
    {
        Ok(broker) => broker,
        Err(error) => {
            tracing::error!(data_dir = %config.data_dir.display(), %error, "cannot open the broker");
            return ExitCode::from(EXIT_STARTUP);
        }
    };
    let shutdown = CancellationToken::new();
    let connections = TaskTracker::new();
    let started = async {
        // The configured users and virtual hosts go in before the node takes part in a
        // cluster: a node that forms one brings them, a node that joins takes the cluster's.
        if config.amqp.enabled {
            config.amqp.apply(&broker).await?;
        }
        let mut listeners = bind_listeners(&config).await?;
        let cluster = start_cluster(&config, &broker, &mut listeners).await?;
        cluster
            .wait_ready(Duration::from_secs(5))
            .await
            .map_err(|reason| anyhow::anyhow!("the cluster refused this node: {reason}"))?;
        let bound = start_listeners(
            &config,
            &broker,
            &cluster,
            listeners,
            &shutdown,
            &connections,
        )?;
        anyhow::Ok((cluster, bound))
    }
    .await;
    let (cluster, bound) = match started {
        Ok(started) => started,
        Err(error) => {
            tracing::error!("{error:#}");
            let _ = broker.shutdown().await;
            return ExitCode::from(EXIT_STARTUP);
        }
    };
    if let Some(path) = &ready_file
        && let Err(error) = write_ready_file(path, &bound)
    {
        tracing::error!("{error:#}");
        let _ = broker.shutdown().await;
        return ExitCode::from(EXIT_STARTUP);
    }
    if let Some(admin) = &bound.admin {
        admin.set_ready(true);
    }
    tracing::info!(data_dir = %config.data_dir.display(), listeners = ?bound.addresses, "sluice is ready");

    let code = tokio::select! {
        signal = wait_for_signal() => {
            tracing::info!(signal, "shutting down");
            None
        }
        report = fatal.recv() => {
            let report = report.map_or_else(|| "unknown".to_owned(), |r| format!("{}: {}", r.task, r.reason));
            tracing::error!(task = %report, "a core task died; stopping");
            Some(EXIT_CORE_TASK_DIED)
        }
    };

    if let Some(admin) = &bound.admin {
        admin.set_ready(false);
    }
    // Kafka's controlled shutdown: partitions led here go to other replicas first, while
    // clients are still connected (they are answered NOT_LEADER_OR_FOLLOWER and move), so
    // the grace period below costs no partition its leader.
    cluster.begin_stopping().await;
    let handed = broker.hand_over_leadership().await;
    if handed > 0 {
        tracing::info!(
            partitions = handed,
            "handed over the leadership of partitions led here"
        );
    }
    // Stop accepting, then give connections the grace period to finish what they started.
    shutdown.cancel();
    connections.close();
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = config.shutdown_grace_ms,
            "connections still open after the grace period; closing them"
        );
    }
    cluster.shutdown().await;
    let closed = broker.shutdown().await;
    match (code, closed) {
        (Some(code), _) => ExitCode::from(code),
        (None, Ok(())) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        (None, Err(error)) => {
            tracing::error!(%error, "data may not be fully on disk");
            ExitCode::from(EXIT_STARTUP)
        }
    }
}

async fn bind(
    enabled: bool,
    address: SocketAddr,
    what: &str,
) -> anyhow::Result<Option<(TcpListener, SocketAddr)>> {
    if !enabled {
        return Ok(None);
    }
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for {what} on {address}"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("{what} listener address"))?;
    Ok(Some((listener, local)))
}

async fn bind_listeners(config: &Config) -> anyhow::Result<Listeners> {
    let kafka = bind(
        config.kafka.enabled,
        config.kafka_listen()?,
        "Kafka clients",
    )
    .await?;
    let amqp = if config.amqp.enabled {
        bind(true, config.amqp.listen_address()?, "AMQP clients").await?
    } else {
        None
    };
    let http = bind(config.http.enabled, config.http_listen()?, "HTTP").await?;
    let (cluster, cluster_local) = bind(true, config.cluster_listen()?, "other cluster nodes")
        .await?
        .context("the cluster listener")?;
    Ok(Listeners {
        kafka,
        amqp,
        http,
        cluster: Some(cluster),
        cluster_local,
    })
}

/// The host and port Kafka clients are told for a listener bound at `local`.
fn kafka_advertised(config: &Config, local: SocketAddr) -> (String, u16) {
    (
        config
            .kafka
            .advertised_host
            .clone()
            .unwrap_or_else(|| advertised_host_for(local)),
        config.kafka.advertised_port.unwrap_or(local.port()),
    )
}

fn advertised(local: SocketAddr) -> String {
    format!("{}:{}", advertised_host_for(local), local.port())
}

/// Starts this node's part in the cluster: forms one of its own when it has no seeds.
async fn start_cluster(
    config: &Config,
    broker: &Broker,
    listeners: &mut Listeners,
) -> anyhow::Result<Arc<Cluster>> {
    let advertise = config
        .cluster
        .advertise
        .clone()
        .unwrap_or_else(|| advertised(listeners.cluster_local));
    let settings = ClusterSettings {
        advertise,
        // The cluster drops the seeds that name this node itself.
        seeds: config.cluster.seeds.clone(),
        wait_for_invite: config.cluster.wait_for_invite,
        kafka_addr: listeners.kafka.as_ref().map(|(_, local)| {
            let (host, port) = kafka_advertised(config, *local);
            format!("{host}:{port}")
        }),
        amqp_addr: listeners.amqp.as_ref().map(|(_, local)| {
            config
                .cluster
                .advertise_amqp
                .clone()
                .unwrap_or_else(|| advertised(*local))
        }),
        http_addr: listeners.http.as_ref().map(|(_, local)| {
            config
                .cluster
                .advertise_http
                .clone()
                .unwrap_or_else(|| advertised(*local))
        }),
        controller: ControllerSettings {
            snapshot_every: config.cluster.snapshot_entries,
            logs_kept: config.cluster.snapshot_entries / 5,
            ..ControllerSettings::default()
        },
        partition_timing: PartitionTiming {
            heartbeat_ms: config.cluster.partition_heartbeat_ms,
            election_min_ms: config.cluster.partition_election_timeout_ms,
            election_max_ms: 2 * config.cluster.partition_election_timeout_ms,
            quiesce: config.cluster.partition_quiesce,
        },
    };
    let listener = listeners
        .cluster
        .take()
        .context("the cluster listener is in use")?;
    Cluster::start(
        &cluster_dir(config),
        listener,
        settings,
        Some(broker.clone()),
    )
    .await
    .context("cannot take part in the cluster")
}

fn start_listeners(
    config: &Config,
    broker: &Broker,
    cluster: &Arc<Cluster>,
    listeners: Listeners,
    shutdown: &CancellationToken,
    connections: &TaskTracker,
) -> anyhow::Result<Bound> {
    let mut addresses = BTreeMap::new();
    addresses.insert("cluster", listeners.cluster_local.to_string());
    let kafka_frontend = Arc::new(sluice_kafka::KafkaFrontend::default());
    let amqp_frontend = Arc::new(sluice_amqp::observe::AmqpFrontend::default());
    if let Some((listener, local)) = listeners.kafka {
        addresses.insert("kafka", local.to_string());
        let (advertised_host, advertised_port) = kafka_advertised(config, local);
        let settings = sluice_kafka::KafkaSettings {
            advertised_host,
            advertised_port,
            listen_address: local.to_string(),
            max_request_bytes: config.kafka.max_request_bytes,
            max_connections: config.kafka.max_connections,
            fetch_max_bytes: config.kafka.fetch_max_bytes,
            replica_fetch_max_bytes: config.kafka.replica_fetch_max_bytes,
        };
        tokio::spawn(sluice_kafka::serve(
            listener,
            broker.clone(),
            settings,
            Arc::clone(&kafka_frontend),
            shutdown.clone(),
            connections.clone(),
        ));
    }
    if let Some((listener, local)) = listeners.amqp {
        addresses.insert("amqp", local.to_string());
        tokio::spawn(sluice_amqp::serve(
            listener,
            broker.clone(),
            config.amqp.settings(),
            Arc::clone(&amqp_frontend),
            shutdown.clone(),
            connections.clone(),
        ));
    }
    let mut admin = None;
    if let Some((listener, local)) = listeners.http {
        addresses.insert("http", local.to_string());
        let named = addresses
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let state =
            sluice_admin::AdminState::new(broker.clone(), kafka_frontend, amqp_frontend, named);
        state.set_cluster(Arc::clone(cluster));
        connections.spawn(sluice_admin::serve(
            listener,
            Arc::clone(&state),
            shutdown.clone(),
        ));
        admin = Some(state);
    }
    Ok(Bound { addresses, admin })
}

/// The host to advertise for a listener: its own address, or the machine's name when it listens
/// on every interface (an unspecified address means nothing to a client).
fn advertised_host_for(local: std::net::SocketAddr) -> String {
    if !local.ip().is_unspecified() {
        return local.ip().to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn write_ready_file(path: &std::path::Path, bound: &Bound) -> anyhow::Result<()> {
    let json = serde_json::to_vec(&bound.addresses).context("encode the ready file")?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        },
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT will stop the broker");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
