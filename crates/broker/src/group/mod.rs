//! Consumer groups: membership and rebalancing (a pure state machine per group, [`state`])
//! driven by one coordinator task ([`GroupCoordinator`]) that owns every group.
//!
//! The coordinator keeps membership in memory only, as clients expect a coordinator to lose it
//! on failover: after a restart members get UNKNOWN_MEMBER_ID and rejoin. Committed offsets,
//! which must survive, live in the offset store.
//!
//! Bounds: the request channel holds 1024 requests; at most `max_group_count` groups exist at
//! once; each group holds at most `max_group_size` members.

pub mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_storage::Clock;
use tokio::sync::{mpsc, oneshot};

use state::Group;
pub use state::{
    Effect, GroupDescription, GroupError, GroupLimits, GroupState, JoinOutcome, JoinRequest,
    JoinedMember, MemberDescription, SyncOutcome, SyncRequest, Token,
};

/// Groups the coordinator holds at once before it refuses new ones.
pub const MAX_GROUP_COUNT: usize = 100_000;

/// A group as ListGroups shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    pub group_id: String,
    pub state: GroupState,
    pub protocol_type: String,
}

type Reply<T> = oneshot::Sender<T>;

#[derive(Debug)]
enum Command {
    Join(String, JoinRequest, Reply<JoinOutcome>),
    Sync(String, SyncRequest, Reply<SyncOutcome>),
    Heartbeat {
        group: String,
        member_id: String,
        instance_id: Option<String>,
        generation: i32,
        reply: Reply<Result<(), GroupError>>,
    },
    Leave(
        String,
        Vec<(String, Option<String>)>,
        Reply<Result<Vec<Result<(), GroupError>>, GroupError>>,
    ),
    CheckCommit {
        group: String,
        member_id: String,
        instance_id: Option<String>,
        generation: i32,
        reply: Reply<Result<(), GroupError>>,
    },
    Describe(String, Reply<Option<GroupDescription>>),
    List(Reply<Vec<GroupListing>>),
    /// Forget a group with no members. `Ok(true)` if there was state to forget.
    Forget(String, Reply<Result<bool, GroupError>>),
    /// Drop every group whose id `belongs` says, members and all: this node stopped
    /// coordinating them. Answers how many were dropped.
    Unload(GroupFilter, Reply<usize>),
}

/// Picks groups by id.
struct GroupFilter(Box<dyn Fn(&str) -> bool + Send>);

impl std::fmt::Debug for GroupFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupFilter")
    }
}

/// The handle front-ends use. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GroupCoordinator {
    commands: mpsc::Sender<Command>,
}

impl GroupCoordinator {
    /// Starts the coordinator task; the caller supervises the returned handle.
    pub fn start(
        limits: GroupLimits,
        clock: Arc<dyn Clock>,
    ) -> (Self, tokio::task::JoinHandle<Result<(), String>>) {
        let (commands, receiver) = mpsc::channel(1024);
        let task = tokio::spawn(run(limits, clock, receiver));
        (Self { commands }, task)
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, GroupError> {
        let (reply, receive) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| GroupError::CoordinatorNotAvailable)?;
        receive
            .await
            .map_err(|_| GroupError::CoordinatorNotAvailable)
    }

    /// Joins (or rejoins) a group; waits until the rebalance completes.
    pub async fn join(&self, group: &str, request: JoinRequest) -> JoinOutcome {
        let member_id = request.member_id.clone();
        self.ask(|reply| Command::Join(group.to_owned(), request, reply))
            .await
            .unwrap_or_else(|error| JoinOutcome {
                error: Some(error),
                generation: -1,
                protocol_type: None,
                protocol_name: None,
                leader: String::new(),
                member_id,
                members: Vec::new(),
            })
    }

    /// Syncs a member; waits for the leader's assignments.
    pub async fn sync(&self, group: &str, request: SyncRequest) -> SyncOutcome {
        self.ask(|reply| Command::Sync(group.to_owned(), request, reply))
            .await
            .unwrap_or_else(|error| SyncOutcome {
                error: Some(error),
                protocol_type: None,
                protocol_name: None,
                assignment: Default::default(),
            })
    }

    pub async fn heartbeat(
        &self,
        group: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> Result<(), GroupError> {
        self.ask(|reply| Command::Heartbeat {
            group: group.to_owned(),
            member_id: member_id.to_owned(),
            instance_id: instance_id.map(str::to_owned),
            generation,
            reply,
        })
        .await?
    }

    /// Members leave; returns each member's result.
    pub async fn leave(
        &self,
        group: &str,
        members: Vec<(String, Option<String>)>,
    ) -> Result<Vec<Result<(), GroupError>>, GroupError> {
        self.ask(|reply| Command::Leave(group.to_owned(), members, reply))
            .await?
    }

    pub async fn check_commit(
        &self,
        group: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> Result<(), GroupError> {
        self.ask(|reply| Command::CheckCommit {
            group: group.to_owned(),
            member_id: member_id.to_owned(),
            instance_id: instance_id.map(str::to_owned),
            generation,
            reply,
        })
        .await?
    }

    pub async fn describe(&self, group: &str) -> Result<Option<GroupDescription>, GroupError> {
        self.ask(|reply| Command::Describe(group.to_owned(), reply))
            .await
    }

    pub async fn list(&self) -> Result<Vec<GroupListing>, GroupError> {
        self.ask(Command::List).await
    }

    /// Drops the groups `belongs` picks, members and all (their waiting joins and syncs are
    /// answered NOT_COORDINATOR): this node no longer coordinates them, and the state it had
    /// would be stale if it coordinated them again. Returns how many were dropped.
    pub async fn unload(
        &self,
        belongs: impl Fn(&str) -> bool + Send + 'static,
    ) -> Result<usize, GroupError> {
        self.ask(|reply| Command::Unload(GroupFilter(Box::new(belongs)), reply))
            .await
    }

    /// Forgets a group's membership state if it has no members.
    pub async fn forget(&self, group: &str) -> Result<bool, GroupError> {
        self.ask(|reply| Command::Forget(group.to_owned(), reply))
            .await?
    }
}

struct Coordinator {
    limits: GroupLimits,
    groups: HashMap<String, Group>,
    joins: HashMap<Token, Reply<JoinOutcome>>,
    syncs: HashMap<Token, Reply<SyncOutcome>>,
    next_token: Token,
}

impl Coordinator {
    fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    fn deliver(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Join(token, outcome) => {
                    if let Some(reply) = self.joins.remove(&token) {
                        let _ = reply.send(outcome);
                    }
                }
                Effect::Sync(token, outcome) => {
                    if let Some(reply) = self.syncs.remove(&token) {
                        let _ = reply.send(outcome);
                    }
                }
            }
        }
    }

    /// The group, created if it may be.
    fn group(&mut self, id: &str) -> Option<&mut Group> {
        if !self.groups.contains_key(id) {
            if self.groups.len() >= MAX_GROUP_COUNT {
                return None;
            }
            self.groups
                .insert(id.to_owned(), Group::new(id, self.limits));
        }
        self.groups.get_mut(id)
    }

    fn handle(&mut self, command: Command, now_ms: i64) {
        match command {
            Command::Join(group, request, reply) => {
                if group.is_empty() {
                    let _ = reply.send(JoinOutcome {
                        error: Some(GroupError::InvalidGroupId),
                        generation: -1,
                        protocol_type: None,
                        protocol_name: None,
                        leader: String::new(),
                        member_id: request.member_id,
                        members: Vec::new(),
                    });
                    return;
                }
                let token = self.token();
                self.joins.insert(token, reply);
                let effects = match self.group(&group) {
                    Some(found) => found.join(token, request, now_ms),
                    None => vec![Effect::Join(
                        token,
                        JoinOutcome {
                            error: Some(GroupError::CoordinatorNotAvailable),
                            generation: -1,
                            protocol_type: None,
                            protocol_name: None,
                            leader: String::new(),
                            member_id: request.member_id,
                            members: Vec::new(),
                        },
                    )],
                };
                self.deliver(effects);
            }
            Command::Sync(group, request, reply) => {
                let token = self.token();
                self.syncs.insert(token, reply);
                let effects = match self.groups.get_mut(&group) {
                    Some(found) => found.sync(token, request, now_ms),
                    None => vec![Effect::Sync(
                        token,
                        SyncOutcome {
                            error: Some(GroupError::UnknownMemberId),
                            protocol_type: None,
                            protocol_name: None,
                            assignment: Default::default(),
                        },
                    )],
                };
                self.deliver(effects);
            }
            Command::Heartbeat {
                group,
                member_id,
                instance_id,
                generation,
                reply,
            } => {
                let result = match self.groups.get_mut(&group) {
                    Some(found) => {
                        found.heartbeat(&member_id, instance_id.as_deref(), generation, now_ms)
                    }
                    None => Err(GroupError::UnknownMemberId),
                };
                let _ = reply.send(result);
            }
            Command::Leave(group, members, reply) => {
                let result = match self.groups.get_mut(&group) {
                    Some(found) => {
                        let (results, effects) = found.leave(&members, now_ms);
                        self.deliver(effects);
                        Ok(results)
                    }
                    None => Ok(members
                        .iter()
                        .map(|_| Err(GroupError::UnknownMemberId))
                        .collect()),
                };
                let _ = reply.send(result);
            }
            Command::CheckCommit {
                group,
                member_id,
                instance_id,
                generation,
                reply,
            } => {
                let result = match self.groups.get_mut(&group) {
                    Some(found) => {
                        found.check_commit(&member_id, instance_id.as_deref(), generation, now_ms)
                    }
                    // No membership state: only "simple" commits are possible.
                    None if generation < 0 && member_id.is_empty() => Ok(()),
                    None => Err(GroupError::UnknownMemberId),
                };
                let _ = reply.send(result);
            }
            Command::Describe(group, reply) => {
                let _ = reply.send(self.groups.get(&group).map(Group::describe));
            }
            Command::List(reply) => {
                let listing = self
                    .groups
                    .values()
                    .map(|g| {
                        let described = g.describe();
                        GroupListing {
                            group_id: described.group_id,
                            state: described.state,
                            protocol_type: described.protocol_type,
                        }
                    })
                    .collect();
                let _ = reply.send(listing);
            }
            Command::Unload(belongs, reply) => {
                let dropped: Vec<String> = self
                    .groups
                    .keys()
                    .filter(|id| (belongs.0)(id))
                    .cloned()
                    .collect();
                let mut effects = Vec::new();
                for id in &dropped {
                    if let Some(group) = self.groups.remove(id) {
                        effects.extend(group.abandon());
                    }
                }
                self.deliver(effects);
                let _ = reply.send(dropped.len());
            }
            Command::Forget(group, reply) => {
                let result = match self.groups.get(&group) {
                    Some(found) if !found.is_empty() => Err(GroupError::NonEmptyGroup),
                    Some(_) => {
                        self.groups.remove(&group);
                        Ok(true)
                    }
                    None => Ok(false),
                };
                let _ = reply.send(result);
            }
        }
    }

    fn tick(&mut self, now_ms: i64) {
        let mut effects = Vec::new();
        for group in self.groups.values_mut() {
            effects.extend(group.tick(now_ms));
        }
        self.deliver(effects);
        // Drop answer slots whose requester went away, so they cannot accumulate.
        self.joins.retain(|_, reply| !reply.is_closed());
        self.syncs.retain(|_, reply| !reply.is_closed());
    }
}

async fn run(
    limits: GroupLimits,
    clock: Arc<dyn Clock>,
    mut commands: mpsc::Receiver<Command>,
) -> Result<(), String> {
    let mut coordinator = Coordinator {
        limits,
        groups: HashMap::new(),
        joins: HashMap::new(),
        syncs: HashMap::new(),
        next_token: 0,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => coordinator.handle(command, clock.now_ms()),
                None => return Ok(()),
            },
            _ = tick.tick() => coordinator.tick(clock.now_ms()),
        }
    }
}
