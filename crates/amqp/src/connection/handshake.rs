//! The server's side of the AMQP 0-9-1 connection handshake, as a state machine that does no
//! I/O: it is fed the protocol header and the client's `connection.*` methods and answers with
//! what to send or do. What it needs from the broker (checking a password, finding a virtual
//! host, counting the connection under its limits) comes through a [`Gatekeeper`].
//!
//! ```text
//! client                        server
//! "AMQP" 0 0 9 1         →
//!                        ←      connection.start   (mechanisms, capabilities)
//! connection.start-ok    →                         (credentials, client properties)
//!                        ←      connection.tune    (channel_max, frame_max, heartbeat)
//! connection.tune-ok     →                         (what the client takes of them)
//! connection.open        →                         (virtual host)
//!                        ←      connection.open-ok
//! ```
//!
//! Refusals are RabbitMQ's: a client that sends another protocol header gets ours back and the
//! socket closes; a wrong password closes the socket, after a `connection.close` (403) if the
//! client announced `authentication_failure_close`; a bad `tune-ok` or a refused `open` is a
//! connection exception (530), which the connection answers with `connection.close`.
//! `connection.close` itself, valid in any phase, is the connection's to handle.

use amq_protocol::protocol::connection;
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use sluice_broker::users::AuthenticatedUser;

use crate::codec;
use crate::convert::short;
use crate::errors::{self, Exception};
use crate::limits::Refusal;

/// What a client told us it supports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub consumer_cancel_notify: bool,
    pub connection_blocked: bool,
    pub authentication_failure_close: bool,
    /// How the client reads `basic.qos`.
    pub qos: QosReading,
}

/// How a client means `basic.qos`.
///
/// RabbitMQ reads `global = false` as a prefetch for each consumer the channel creates from
/// then on, and `global = true` as a limit shared by the channel's consumers, existing ones
/// included; pika, lapin, the Java client, Spring and most others are written for that. The
/// AMQP 0-9-1 specification reads `global = false` as the shared channel limit, applying at
/// once. kombu (so Celery) uses RabbitMQ's reading only with a server that calls itself
/// RabbitMQ 3.x, and the specification's with any other: a client built on py-amqp gets the
/// specification's reading here, so that the prefetch Celery raises while it holds ETA tasks
/// reaches its running consumer. (`global = true` in that reading would limit the whole
/// connection; Sluice limits the channel.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QosReading {
    #[default]
    RabbitMq,
    Specification,
}

impl QosReading {
    /// Client products (the `product` client property) written for the specification's
    /// reading when the server is not RabbitMQ 3.x.
    const SPECIFICATION_CLIENTS: &[&str] = &["py-amqp"];

    pub fn for_client(product: Option<&str>) -> Self {
        match product {
            Some(product) if Self::SPECIFICATION_CLIENTS.contains(&product) => Self::Specification,
            _ => Self::RabbitMq,
        }
    }
}

/// The limits of a connection: what the server proposes in `connection.tune`, and what the
/// client agreed to in `tune-ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub channel_max: u16,
    pub frame_max: u32,
    /// Seconds between heartbeats, 0 for none.
    pub heartbeat_s: u16,
}

/// Where the handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    AwaitHeader,
    AwaitStartOk,
    AwaitTuneOk,
    AwaitOpen,
    /// `open-ok` was sent: the connection runs.
    Open,
    /// The client was turned away; the socket closes.
    Refused,
}

impl Phase {
    /// The connection state's name in RabbitMQ's texts.
    pub fn name(self) -> &'static str {
        match self {
            Self::AwaitHeader | Self::AwaitStartOk => "starting",
            Self::AwaitTuneOk => "tuning",
            Self::AwaitOpen => "opening",
            Self::Open => "running",
            Self::Refused => "closed",
        }
    }
}

/// What the handshake asks of the broker.
pub trait Gatekeeper {
    /// A virtual host, as `connection.open` finds it.
    type Vhost;
    /// A connection's place under the connection limits, held while it is open.
    type Slot;

    /// The user if the password is theirs.
    fn authenticate(&self, username: &str, password: &str) -> Option<AuthenticatedUser>;
    /// Whether the user may only connect from the loopback interface.
    fn loopback_only(&self, username: &str) -> bool;
    fn vhost(&self, name: &str) -> Option<Self::Vhost>;
    /// Counts a connection of `user` to `vhost` in, unless that passes a limit.
    fn admit(&self, user: &str, vhost: &str) -> Result<Self::Slot, Refusal>;
}

/// A connection that completed the handshake.
#[derive(Debug)]
pub struct Established<V, S> {
    pub user: AuthenticatedUser,
    pub vhost_name: String,
    pub vhost: V,
    pub slot: S,
    pub capabilities: Capabilities,
    /// The client's `connection_name` property, or else its `product`.
    pub client_name: String,
    pub tuning: Tuning,
}

/// What to do after a step of the handshake.
#[derive(Debug)]
pub enum Reply<V, S> {
    /// Send this method on channel 0.
    Send(connection::AMQPMethod),
    /// `tune-ok` was accepted: frames from now on are bounded by the agreed `frame_max`.
    Tuned(Tuning),
    /// Write our protocol header and close the socket: the client speaks another protocol or
    /// another version of this one.
    WrongProtocol,
    /// Login refused for `reason` (for the log, not the client): send `close` if there is
    /// one, then close the socket.
    Refused {
        reason: String,
        close: Option<connection::AMQPMethod>,
    },
    /// `connection.open` was accepted: send `open-ok` and run.
    Open(Box<Established<V, S>>),
}

/// The handshake of one connection.
#[derive(Debug)]
pub struct Handshake {
    phase: Phase,
    /// What `connection.tune` proposes; `tune-ok` may lower it.
    offer: Tuning,
    tuning: Tuning,
    /// Whether the client connected from the loopback interface.
    from_loopback: bool,
    capabilities: Capabilities,
    mechanism: String,
    client_name: String,
    user: Option<AuthenticatedUser>,
}

impl Handshake {
    pub fn new(offer: Tuning, from_loopback: bool) -> Self {
        Self {
            phase: Phase::AwaitHeader,
            offer,
            tuning: offer,
            from_loopback,
            capabilities: Capabilities::default(),
            mechanism: String::new(),
            client_name: String::new(),
            user: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the client has not logged in yet: errors close the socket without a word.
    pub fn before_login(&self) -> bool {
        self.phase <= Phase::AwaitStartOk
    }

    /// The first eight bytes from the client.
    pub fn on_header<V, S>(&mut self, header: &[u8]) -> Reply<V, S> {
        if self.phase != Phase::AwaitHeader || header != codec::PROTOCOL_HEADER {
            self.phase = Phase::Refused;
            return Reply::WrongProtocol;
        }
        self.phase = Phase::AwaitStartOk;
        Reply::Send(connection::AMQPMethod::Start(start()))
    }

    /// A `connection.*` method from the client other than `close` and `close-ok`.
    pub fn on_method<G: Gatekeeper>(
        &mut self,
        gate: &G,
        method: connection::AMQPMethod,
    ) -> Result<Reply<G::Vhost, G::Slot>, Exception> {
        let method_id = method_id(&method);
        match (self.phase, method) {
            (Phase::AwaitStartOk, connection::AMQPMethod::StartOk(start_ok)) => {
                self.on_start_ok(gate, start_ok)
            }
            (Phase::AwaitTuneOk, connection::AMQPMethod::TuneOk(tune_ok)) => {
                self.on_tune_ok(&tune_ok)
            }
            (Phase::AwaitOpen, connection::AMQPMethod::Open(open)) => self.on_open(gate, &open),
            _ => Err(Exception::new(
                errors::CHANNEL_ERROR,
                format!(
                    "unexpected method in connection state {}",
                    self.phase.name()
                ),
            )
            .on(10, method_id)),
        }
    }

    fn on_start_ok<G: Gatekeeper>(
        &mut self,
        gate: &G,
        start_ok: connection::StartOk,
    ) -> Result<Reply<G::Vhost, G::Slot>, Exception> {
        let client = start_ok.client_properties.inner();
        if let Some(AMQPValue::FieldTable(capabilities)) = client.get("capabilities") {
            let flag = |name: &str| {
                matches!(
                    capabilities.inner().get(name),
                    Some(AMQPValue::Boolean(true))
                )
            };
            self.capabilities.consumer_cancel_notify = flag("consumer_cancel_notify");
            self.capabilities.connection_blocked = flag("connection.blocked");
            self.capabilities.authentication_failure_close = flag("authentication_failure_close");
        }
        let text = |key: &str| match client.get(key) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => None,
        };
        self.capabilities.qos = QosReading::for_client(text("product").as_deref());
        self.client_name = text("connection_name")
            .or_else(|| text("product"))
            .unwrap_or_default();
        self.mechanism = start_ok.mechanism.as_str().to_owned();
        let (username, password) =
            match crate::auth::credentials(&self.mechanism, start_ok.response.as_bytes()) {
                Ok(credentials) => credentials,
                Err(reason) if reason.starts_with("unknown") => {
                    return Err(Exception::new(errors::COMMAND_INVALID, reason).on(10, 11));
                }
                Err(reason) => {
                    return Err(Exception::new(errors::SYNTAX_ERROR, reason).on(10, 11));
                }
            };
        let Some(user) = gate.authenticate(&username, &password) else {
            return Ok(self.refuse(format!("user '{username}' - invalid credentials")));
        };
        if !self.from_loopback && gate.loopback_only(&username) {
            return Ok(self.refuse(format!("user '{username}' can only connect via localhost")));
        }
        self.user = Some(user);
        self.phase = Phase::AwaitTuneOk;
        Ok(Reply::Send(connection::AMQPMethod::Tune(
            connection::Tune {
                channel_max: self.offer.channel_max,
                frame_max: self.offer.frame_max,
                heartbeat: self.offer.heartbeat_s,
            },
        )))
    }

    /// Authentication failed: say so if the client asked (capability
    /// `authentication_failure_close`), then close the socket.
    fn refuse<V, S>(&mut self, reason: String) -> Reply<V, S> {
        self.phase = Phase::Refused;
        let close = self.capabilities.authentication_failure_close.then(|| {
            let exception = Exception::new(
                errors::ACCESS_REFUSED,
                format!(
                    "Login was refused using authentication mechanism {}. For details see the broker logfile.",
                    self.mechanism
                ),
            );
            connection::AMQPMethod::Close(connection::Close {
                reply_code: exception.code,
                reply_text: short(&exception.reply_text()),
                class_id: 0,
                method_id: 0,
            })
        });
        Reply::Refused { reason, close }
    }

    fn on_tune_ok<V, S>(&mut self, tune_ok: &connection::TuneOk) -> Result<Reply<V, S>, Exception> {
        let fail = |field: &str, value: u64, lower: bool, limit: u64| {
            Err(Exception::new(
                errors::NOT_ALLOWED,
                format!(
                    "negotiated {field} = {value} is {} than the {} allowed value ({limit})",
                    if lower { "lower" } else { "higher" },
                    if lower { "minimum" } else { "maximum" },
                ),
            )
            .on(10, 31))
        };
        let offer = self.offer;
        let frame_max = tune_ok.frame_max;
        if frame_max != 0 && frame_max < codec::FRAME_MIN_SIZE {
            return fail(
                "frame_max",
                frame_max.into(),
                true,
                codec::FRAME_MIN_SIZE.into(),
            );
        }
        // 0 means "no limit", which the server's limit refuses.
        if frame_max == 0 || frame_max > offer.frame_max {
            return fail("frame_max", frame_max.into(), false, offer.frame_max.into());
        }
        let channel_max = tune_ok.channel_max;
        if channel_max == 0 || channel_max > offer.channel_max {
            return fail(
                "channel_max",
                channel_max.into(),
                false,
                offer.channel_max.into(),
            );
        }
        self.tuning = Tuning {
            channel_max,
            frame_max,
            heartbeat_s: tune_ok.heartbeat,
        };
        self.phase = Phase::AwaitOpen;
        Ok(Reply::Tuned(self.tuning))
    }

    fn on_open<G: Gatekeeper>(
        &mut self,
        gate: &G,
        open: &connection::Open,
    ) -> Result<Reply<G::Vhost, G::Slot>, Exception> {
        let name = open.virtual_host.as_str();
        let Some(user) = self.user.take() else {
            return Err(Exception::new(errors::CHANNEL_ERROR, "not authenticated").on(10, 40));
        };
        let refuse = |text: String| Err(Exception::new(errors::NOT_ALLOWED, text).on(10, 40));
        let Some(vhost) = gate.vhost(name) else {
            return refuse(format!("vhost {name} not found"));
        };
        if !user.can_access_vhost(name) {
            return refuse(format!(
                "access to vhost '{name}' refused for user '{}'",
                user.name
            ));
        }
        let slot = match gate.admit(&user.name, name) {
            Ok(slot) => slot,
            Err(refusal) => return refuse(refusal.text),
        };
        self.phase = Phase::Open;
        Ok(Reply::Open(Box::new(Established {
            user,
            vhost_name: name.to_owned(),
            vhost,
            slot,
            capabilities: self.capabilities,
            client_name: std::mem::take(&mut self.client_name),
            tuning: self.tuning,
        })))
    }
}

/// A `connection.*` method's id, for the exception it causes.
fn method_id(method: &connection::AMQPMethod) -> u16 {
    use connection::AMQPMethod as M;
    match method {
        M::Start(_) => 10,
        M::StartOk(_) => 11,
        M::Secure(_) => 20,
        M::SecureOk(_) => 21,
        M::Tune(_) => 30,
        M::TuneOk(_) => 31,
        M::Open(_) => 40,
        M::OpenOk(_) => 41,
        M::Close(_) => 50,
        M::CloseOk(_) => 51,
        M::Blocked(_) => 60,
        M::Unblocked(_) => 61,
        M::UpdateSecret(_) => 70,
        M::UpdateSecretOk(_) => 71,
    }
}

/// `connection.start`: the protocol version, what the server is and can do, and the
/// mechanisms it accepts.
fn start() -> connection::Start {
    let mut capabilities = FieldTable::default();
    for name in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        capabilities.insert(name.into(), AMQPValue::Boolean(true));
    }
    let mut properties = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    properties.insert("product".into(), text("Sluice"));
    properties.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
    properties.insert("platform".into(), text("Rust"));
    properties.insert("cluster_name".into(), text("sluice"));
    properties.insert(
        "information".into(),
        text("A message broker with embedded durable storage"),
    );
    connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: properties,
        mechanisms: LongString::from(crate::auth::MECHANISMS.as_bytes().to_vec()),
        locales: LongString::from(b"en_US".to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use sluice_broker::limits::Limit;
    use sluice_broker::users::{Permission, UserRecord, hash_password, verify_password};

    use super::*;

    const OFFER: Tuning = Tuning {
        channel_max: 2047,
        frame_max: 131_072,
        heartbeat_s: 60,
    };

    /// Users with real password hashes, virtual hosts by name, and a connection limit per
    /// virtual host; records what it admitted.
    struct Gate {
        users: Vec<UserRecord>,
        loopback_users: Vec<String>,
        vhosts: Vec<&'static str>,
        max_per_vhost: usize,
        admitted: RefCell<Vec<(String, String)>>,
    }

    impl Gate {
        fn new() -> Self {
            let user = |name: &str, password: &str, vhosts: &[&str]| UserRecord {
                name: name.into(),
                password_hash: hash_password(password),
                tags: Vec::new(),
                permissions: vhosts
                    .iter()
                    .map(|vhost| {
                        let all = ".*".to_owned();
                        let permission = Permission {
                            configure: all.clone(),
                            write: all.clone(),
                            read: all,
                        };
                        ((*vhost).to_owned(), permission)
                    })
                    .collect::<BTreeMap<_, _>>(),
                limits: Default::default(),
            };
            Self {
                users: vec![
                    user("guest", "guest", &["/"]),
                    user("alice", "s3cret", &["/", "orders"]),
                ],
                loopback_users: vec!["guest".into()],
                vhosts: vec!["/", "orders", "private"],
                max_per_vhost: 2,
                admitted: RefCell::default(),
            }
        }
    }

    impl Gatekeeper for Gate {
        type Vhost = &'static str;
        type Slot = usize;

        fn authenticate(&self, username: &str, password: &str) -> Option<AuthenticatedUser> {
            let record = self.users.iter().find(|u| u.name == username)?;
            verify_password(&record.password_hash, password).then(|| AuthenticatedUser::new(record))
        }

        fn loopback_only(&self, username: &str) -> bool {
            self.loopback_users.iter().any(|u| u == username)
        }

        fn vhost(&self, name: &str) -> Option<&'static str> {
            self.vhosts.iter().copied().find(|v| *v == name)
        }

        fn admit(&self, user: &str, vhost: &str) -> Result<usize, Refusal> {
            let mut admitted = self.admitted.borrow_mut();
            let open = admitted.iter().filter(|(_, v)| v == vhost).count();
            if open >= self.max_per_vhost {
                return Err(Refusal {
                    limit: Limit::VhostConnections,
                    text: format!(
                        "access to vhost '{vhost}' refused for user '{user}': connection limit ({}) is reached",
                        self.max_per_vhost
                    ),
                });
            }
            admitted.push((user.into(), vhost.into()));
            Ok(admitted.len())
        }
    }

    type Step = Result<Reply<&'static str, usize>, Exception>;

    fn plain(user: &str, password: &str) -> Vec<u8> {
        format!("\0{user}\0{password}").into_bytes()
    }

    fn start_ok(
        mechanism: &str,
        response: Vec<u8>,
        properties: &[(&str, AMQPValue)],
    ) -> connection::AMQPMethod {
        let mut client = FieldTable::default();
        for (key, value) in properties {
            client.insert((*key).into(), value.clone());
        }
        connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: client,
            mechanism: mechanism.into(),
            response: LongString::from(response),
            locale: "en_US".into(),
        })
    }

    fn tune_ok(channel_max: u16, frame_max: u32, heartbeat: u16) -> connection::AMQPMethod {
        connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max,
            frame_max,
            heartbeat,
        })
    }

    fn open(vhost: &str) -> connection::AMQPMethod {
        connection::AMQPMethod::Open(connection::Open {
            virtual_host: vhost.into(),
        })
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
    }

    fn capabilities(names: &[&str]) -> AMQPValue {
        let mut table = FieldTable::default();
        for name in names {
            table.insert((*name).into(), AMQPValue::Boolean(true));
        }
        AMQPValue::FieldTable(table)
    }

    /// A handshake from a loopback client past the header.
    fn started() -> Handshake {
        let mut handshake = Handshake::new(OFFER, true);
        let reply: Reply<&str, usize> = handshake.on_header(codec::PROTOCOL_HEADER);
        assert!(matches!(
            reply,
            Reply::Send(connection::AMQPMethod::Start(_))
        ));
        handshake
    }

    /// A handshake logged in as alice and tuned to the offer.
    fn tuned(gate: &Gate) -> Handshake {
        let mut handshake = started();
        let step: Step =
            handshake.on_method(gate, start_ok("PLAIN", plain("alice", "s3cret"), &[]));
        assert!(matches!(
            step,
            Ok(Reply::Send(connection::AMQPMethod::Tune(_)))
        ));
        let step: Step = handshake.on_method(gate, tune_ok(2047, 131_072, 60));
        assert!(matches!(step, Ok(Reply::Tuned(_))));
        handshake
    }

    fn refusal_code(step: Step) -> (u16, String) {
        match step {
            Err(exception) => (exception.code, exception.explanation),
            Ok(reply) => panic!("expected a refusal, got {reply:?}"),
        }
    }

    #[test]
    fn a_client_walks_through_start_tune_and_open() {
        let gate = Gate::new();
        let mut handshake = Handshake::new(OFFER, true);
        assert_eq!(handshake.phase(), Phase::AwaitHeader);
        assert!(handshake.before_login());

        let Reply::Send(connection::AMQPMethod::Start(start)) =
            handshake.on_header::<&str, usize>(b"AMQP\x00\x00\x09\x01")
        else {
            panic!("expected connection.start");
        };
        assert_eq!((start.version_major, start.version_minor), (0, 9));
        assert_eq!(start.mechanisms.as_bytes(), b"PLAIN AMQPLAIN");
        let properties = start.server_properties.inner();
        assert_eq!(properties.get("product"), Some(&text("Sluice")));
        let Some(AMQPValue::FieldTable(offered)) = properties.get("capabilities") else {
            panic!("capabilities missing");
        };
        for name in ["publisher_confirms", "basic.nack", "direct_reply_to"] {
            assert_eq!(offered.inner().get(name), Some(&AMQPValue::Boolean(true)));
        }

        let properties = [
            ("product", text("pika")),
            ("connection_name", text("orders-service")),
            (
                "capabilities",
                capabilities(&["consumer_cancel_notify", "connection.blocked"]),
            ),
        ];
        let step = handshake.on_method(
            &gate,
            start_ok("PLAIN", plain("alice", "s3cret"), &properties),
        );
        let Ok(Reply::Send(connection::AMQPMethod::Tune(tune))) = step else {
            panic!("expected connection.tune, got {step:?}");
        };
        assert_eq!(
            (tune.channel_max, tune.frame_max, tune.heartbeat),
            (2047, 131_072, 60)
        );
        assert_eq!(handshake.phase(), Phase::AwaitTuneOk);
        assert!(!handshake.before_login());

        // The client may take less than offered.
        let step = handshake.on_method(&gate, tune_ok(100, 65_536, 0));
        let Ok(Reply::Tuned(tuning)) = step else {
            panic!("expected the tuning, got {step:?}");
        };
        let agreed = Tuning {
            channel_max: 100,
            frame_max: 65_536,
            heartbeat_s: 0,
        };
        assert_eq!(tuning, agreed);

        let step = handshake.on_method(&gate, open("orders"));
        let Ok(Reply::Open(established)) = step else {
            panic!("expected the connection open, got {step:?}");
        };
        assert_eq!(handshake.phase(), Phase::Open);
        assert_eq!(established.user.name, "alice");
        assert_eq!(established.vhost_name, "orders");
        assert_eq!(established.vhost, "orders");
        assert_eq!(established.slot, 1);
        assert_eq!(established.client_name, "orders-service");
        assert_eq!(established.tuning, agreed);
        assert_eq!(
            established.capabilities,
            Capabilities {
                consumer_cancel_notify: true,
                connection_blocked: true,
                authentication_failure_close: false,
                qos: QosReading::RabbitMq,
            }
        );
        assert_eq!(*gate.admitted.borrow(), [("alice".into(), "orders".into())]);
    }

    #[test]
    fn another_protocol_gets_our_header_back() {
        for header in [
            &b"AMQP\x01\x01\x00\x0a"[..],
            b"AMQP\x00\x00\x09\x00",
            b"GET / HT",
        ] {
            let mut handshake = Handshake::new(OFFER, true);
            let reply: Reply<&str, usize> = handshake.on_header(header);
            assert!(matches!(reply, Reply::WrongProtocol), "{header:?}");
            assert_eq!(handshake.phase(), Phase::Refused);
        }
    }

    #[test]
    fn amqplain_credentials_log_in() {
        let gate = Gate::new();
        let mut handshake = started();
        // LOGIN and PASSWORD as long strings, without the table's length prefix.
        let mut response = Vec::new();
        for (key, value) in [("LOGIN", "alice"), ("PASSWORD", "s3cret")] {
            response.push(key.len() as u8);
            response.extend_from_slice(key.as_bytes());
            response.push(b'S');
            response.extend_from_slice(&(value.len() as u32).to_be_bytes());
            response.extend_from_slice(value.as_bytes());
        }
        let step = handshake.on_method(&gate, start_ok("AMQPLAIN", response, &[]));
        assert!(matches!(
            step,
            Ok(Reply::Send(connection::AMQPMethod::Tune(_)))
        ));
    }

    #[test]
    fn a_wrong_password_closes_the_socket_and_says_why_only_when_asked() {
        let gate = Gate::new();
        let mut handshake = started();
        let step = handshake.on_method(&gate, start_ok("PLAIN", plain("alice", "wrong"), &[]));
        let Ok(Reply::Refused {
            reason,
            close: None,
        }) = step
        else {
            panic!("expected a silent refusal, got {step:?}");
        };
        assert_eq!(reason, "user 'alice' - invalid credentials");
        assert_eq!(handshake.phase(), Phase::Refused);

        let mut handshake = started();
        let asked = [(
            "capabilities",
            capabilities(&["authentication_failure_close"]),
        )];
        let step = handshake.on_method(&gate, start_ok("PLAIN", plain("nobody", "x"), &asked));
        let Ok(Reply::Refused {
            close: Some(connection::AMQPMethod::Close(close)),
            ..
        }) = step
        else {
            panic!("expected connection.close, got {step:?}");
        };
        assert_eq!(close.reply_code, 403);
        assert_eq!(
            close.reply_text.as_str(),
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile."
        );
        // A later method does not bring the handshake back.
        let step = handshake.on_method(&gate, tune_ok(2047, 131_072, 60));
        assert_eq!(refusal_code(step).0, errors::CHANNEL_ERROR);
    }

    #[test]
    fn loopback_users_are_refused_from_elsewhere() {
        let gate = Gate::new();
        let mut handshake = Handshake::new(OFFER, false);
        let _: Reply<&str, usize> = handshake.on_header(codec::PROTOCOL_HEADER);
        let step = handshake.on_method(&gate, start_ok("PLAIN", plain("guest", "guest"), &[]));
        let Ok(Reply::Refused {
            reason,
            close: None,
        }) = step
        else {
            panic!("expected a silent refusal, got {step:?}");
        };
        assert_eq!(reason, "user 'guest' can only connect via localhost");

        // Other users may connect from anywhere; guest from the loopback interface.
        let mut handshake = Handshake::new(OFFER, false);
        let _: Reply<&str, usize> = handshake.on_header(codec::PROTOCOL_HEADER);
        let step = handshake.on_method(&gate, start_ok("PLAIN", plain("alice", "s3cret"), &[]));
        assert!(matches!(step, Ok(Reply::Send(_))), "{step:?}");
        let mut handshake = started();
        let step = handshake.on_method(&gate, start_ok("PLAIN", plain("guest", "guest"), &[]));
        assert!(matches!(step, Ok(Reply::Send(_))), "{step:?}");
    }

    #[test]
    fn unreadable_credentials_are_connection_errors() {
        let gate = Gate::new();
        let mut handshake = started();
        let step = handshake.on_method(&gate, start_ok("EXTERNAL", Vec::new(), &[]));
        let (code, text) = refusal_code(step);
        assert_eq!(code, errors::COMMAND_INVALID);
        assert_eq!(text, "unknown authentication mechanism 'EXTERNAL'");

        let mut handshake = started();
        let step = handshake.on_method(&gate, start_ok("PLAIN", b"alice".to_vec(), &[]));
        assert_eq!(refusal_code(step).0, errors::SYNTAX_ERROR);
    }

    #[test]
    fn tune_ok_may_not_exceed_the_offer() {
        let gate = Gate::new();
        let cases: [(u16, u32, &str); 5] = [
            (
                2047,
                4095,
                "negotiated frame_max = 4095 is lower than the minimum allowed value (4096)",
            ),
            (
                2047,
                0,
                "negotiated frame_max = 0 is higher than the maximum allowed value (131072)",
            ),
            (
                2047,
                131_073,
                "negotiated frame_max = 131073 is higher than the maximum allowed value (131072)",
            ),
            (
                0,
                131_072,
                "negotiated channel_max = 0 is higher than the maximum allowed value (2047)",
            ),
            (
                2048,
                131_072,
                "negotiated channel_max = 2048 is higher than the maximum allowed value (2047)",
            ),
        ];
        for (channel_max, frame_max, expected) in cases {
            let mut handshake = started();
            let _ = handshake.on_method(&gate, start_ok("PLAIN", plain("alice", "s3cret"), &[]));
            let step = handshake.on_method(&gate, tune_ok(channel_max, frame_max, 60));
            let Err(exception) = step else {
                panic!("expected a refusal for {channel_max}/{frame_max}, got {step:?}");
            };
            assert_eq!(exception.code, errors::NOT_ALLOWED);
            assert_eq!((exception.class_id, exception.method_id), (10, 31));
            assert_eq!(exception.explanation, expected);
        }
    }

    #[test]
    fn open_refuses_unknown_and_forbidden_vhosts_and_limits() {
        let gate = Gate::new();
        let mut handshake = tuned(&gate);
        let (code, text) = refusal_code(handshake.on_method(&gate, open("nowhere")));
        assert_eq!((code, text.as_str()), (530, "vhost nowhere not found"));

        let mut handshake = tuned(&gate);
        let (code, text) = refusal_code(handshake.on_method(&gate, open("private")));
        assert_eq!(
            (code, text.as_str()),
            (530, "access to vhost 'private' refused for user 'alice'")
        );

        for _ in 0..2 {
            let mut handshake = tuned(&gate);
            assert!(matches!(
                handshake.on_method(&gate, open("/")),
                Ok(Reply::Open(_))
            ));
        }
        let mut handshake = tuned(&gate);
        let (code, text) = refusal_code(handshake.on_method(&gate, open("/")));
        assert_eq!(
            (code, text.as_str()),
            (
                530,
                "access to vhost '/' refused for user 'alice': connection limit (2) is reached"
            )
        );
        assert_eq!(gate.admitted.borrow().len(), 2);
    }

    #[test]
    fn methods_out_of_order_are_refused() {
        let gate = Gate::new();
        let mut handshake = started();
        let (code, text) = refusal_code(handshake.on_method(&gate, open("/")));
        assert_eq!(
            (code, text.as_str()),
            (504, "unexpected method in connection state starting")
        );

        let mut handshake = tuned(&gate);
        let step = handshake.on_method(&gate, start_ok("PLAIN", plain("alice", "s3cret"), &[]));
        let Err(exception) = step else {
            panic!("expected a refusal");
        };
        assert_eq!(
            exception.explanation,
            "unexpected method in connection state opening"
        );
        assert_eq!((exception.class_id, exception.method_id), (10, 11));

        // A second header is not a protocol header any more.
        let mut handshake = started();
        let reply: Reply<&str, usize> = handshake.on_header(codec::PROTOCOL_HEADER);
        assert!(matches!(reply, Reply::WrongProtocol));
    }

    #[test]
    fn py_amqp_clients_get_the_specifications_qos() {
        for (product, reading) in [
            ("py-amqp", QosReading::Specification),
            ("pika", QosReading::RabbitMq),
            ("", QosReading::RabbitMq),
        ] {
            let gate = Gate::new();
            let mut handshake = started();
            let properties = [("product", text(product))];
            let _ = handshake.on_method(
                &gate,
                start_ok("PLAIN", plain("alice", "s3cret"), &properties),
            );
            let _ = handshake.on_method(&gate, tune_ok(2047, 131_072, 60));
            let Ok(Reply::Open(established)) = handshake.on_method(&gate, open("orders")) else {
                panic!("expected the connection open");
            };
            assert_eq!(established.capabilities.qos, reading, "{product}");
            // Without a connection name the product names the client.
            assert_eq!(established.client_name, product);
        }
    }
}
