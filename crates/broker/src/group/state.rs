//! One consumer group's membership, as a pure state machine.
//!
//! Inputs are requests (join, sync, heartbeat, leave, commit checks) and clock ticks, each with
//! the current time; outputs are [`Effect`]s naming which waiting request gets which answer.
//! Nothing here does I/O or reads a clock, so tests drive it step by step.
//!
//! The protocol is Kafka's classic rebalance: members join (the first join of a new member
//! may be answered "member id required", KIP-394), the group waits until every known member has
//! rejoined or the rebalance timeout passes, picks a protocol all members support, names a
//! leader and bumps the generation; the leader computes assignments and sends them with its
//! sync, and every member receives its own. Heartbeats keep members alive within their session
//! timeout. Members with a `group.instance.id` (static membership, KIP-345) keep their place
//! across restarts: rejoining under the same instance id replaces the old member id without a
//! rebalance if nothing changed.
//!
//! States: Empty → PreparingRebalance → CompletingRebalance → Stable, back to
//! PreparingRebalance whenever membership or protocols change.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use uuid::Uuid;

/// A request waiting for its answer, named by the coordinator.
pub type Token = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupError {
    UnknownMemberId,
    IllegalGeneration,
    RebalanceInProgress,
    /// Answer to a new member's first join (KIP-394); the reply carries its member id.
    MemberIdRequired,
    InconsistentGroupProtocol,
    InvalidSessionTimeout,
    FencedInstanceId,
    GroupMaxSizeReached,
    NonEmptyGroup,
    GroupIdNotFound,
    InvalidGroupId,
    /// The coordinator is shutting down.
    CoordinatorNotAvailable,
    /// This node stopped coordinating the group.
    NotCoordinator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    /// The name Kafka clients display.
    pub fn name(self) -> &'static str {
        match self {
            Self::Empty => "Empty",
            Self::PreparingRebalance => "PreparingRebalance",
            Self::CompletingRebalance => "CompletingRebalance",
            Self::Stable => "Stable",
        }
    }
}

/// Limits that apply to every group.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    pub min_session_timeout_ms: i32,
    pub max_session_timeout_ms: i32,
    /// How long a group that was empty waits for more members before its first rebalance.
    pub initial_rebalance_delay_ms: i64,
    pub max_group_size: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        Self {
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
            max_group_size: 1_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// Empty for a member joining for the first time.
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    /// (name, metadata) in the member's order of preference.
    pub protocols: Vec<(String, Bytes)>,
    /// Clients from JoinGroup v4 on expect MEMBER_ID_REQUIRED on their first join.
    pub require_known_member_id: bool,
    /// The UUID in the member id this join creates, if it creates one (Kafka's
    /// `client_id-UUID`). Drawn by whoever builds the request, so that the state machine stays
    /// free of randomness.
    pub new_member_uuid: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedMember {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub metadata: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOutcome {
    pub error: Option<GroupError>,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Every member with its metadata, for the leader only.
    pub members: Vec<JoinedMember>,
}

impl JoinOutcome {
    fn error(error: GroupError, member_id: &str) -> Self {
        Self {
            error: Some(error),
            generation: -1,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id: member_id.to_owned(),
            members: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    /// The leader's assignment for each member; empty from followers.
    pub assignments: Vec<(String, Bytes)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub error: Option<GroupError>,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

impl SyncOutcome {
    fn error(error: GroupError) -> Self {
        Self {
            error: Some(error),
            protocol_type: None,
            protocol_name: None,
            assignment: Bytes::new(),
        }
    }
}

/// An answer for a waiting request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Join(Token, JoinOutcome),
    Sync(Token, SyncOutcome),
}

/// One member as DescribeGroups shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    pub state: GroupState,
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    pub leader: Option<String>,
    pub members: Vec<MemberDescription>,
}

#[derive(Debug, Clone)]
struct Member {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout_ms: i32,
    rebalance_timeout_ms: i32,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_heard_ms: i64,
    /// Order of joining; the earliest remaining member leads.
    joined_seq: u64,
    awaiting_join: Option<Token>,
    awaiting_sync: Option<Token>,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, metadata)| metadata.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct Group {
    id: String,
    limits: GroupLimits,
    state: GroupState,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Instance id → member id of static members.
    instances: HashMap<String, String>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, and when they lapse.
    pending_ids: HashMap<String, i64>,
    /// When the current rebalance phase gives up waiting.
    deadline_ms: Option<i64>,
    /// When an initial delayed rebalance may complete at the earliest.
    initial_delay_until_ms: Option<i64>,
    next_seq: u64,
}

impl Group {
    pub fn new(id: impl Into<String>, limits: GroupLimits) -> Self {
        Self {
            id: id.into(),
            limits,
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            instances: HashMap::new(),
            pending_ids: HashMap::new(),
            deadline_ms: None,
            initial_delay_until_ms: None,
            next_seq: 0,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn state(&self) -> GroupState {
        self.state
    }

    pub fn generation(&self) -> i32 {
        self.generation
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The member id a join creates: the client id (the instance id for a static member) and a
    /// UUID, as Kafka makes them. Never handed out twice, also across coordinator restarts,
    /// so a member left over from before a restart cannot rejoin under a newcomer's id.
    fn new_member_id(request: &JoinRequest) -> String {
        let prefix = request
            .instance_id
            .as_deref()
            .unwrap_or(request.client_id.as_str());
        format!("{prefix}-{}", request.new_member_uuid)
    }

    fn check_protocols(&self, request: &JoinRequest) -> Result<(), GroupError> {
        if request.protocol_type.is_empty() || request.protocols.is_empty() {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        if self.members.is_empty() {
            return Ok(());
        }
        if self.protocol_type.as_deref() != Some(request.protocol_type.as_str()) {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        // Every member must share at least one protocol with the newcomer.
        let shared = request.protocols.iter().any(|(name, _)| {
            self.members
                .values()
                .filter(|m| m.id != request.member_id)
                .all(|m| m.protocols.iter().any(|(other, _)| other == name))
        });
        if shared {
            Ok(())
        } else {
            Err(GroupError::InconsistentGroupProtocol)
        }
    }

    /// A member joins or rejoins. May answer at once, or later (through `tick` or another
    /// member's request).
    pub fn join(&mut self, token: Token, request: JoinRequest, now_ms: i64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let answer_now = |outcome: JoinOutcome| vec![Effect::Join(token, outcome)];
        if request.session_timeout_ms < self.limits.min_session_timeout_ms
            || request.session_timeout_ms > self.limits.max_session_timeout_ms
        {
            return answer_now(JoinOutcome::error(
                GroupError::InvalidSessionTimeout,
                &request.member_id,
            ));
        }
        if let Err(error) = self.check_protocols(&request) {
            return answer_now(JoinOutcome::error(error, &request.member_id));
        }

        // Static members: the instance id decides who this is.
        if let Some(instance) = &request.instance_id
            && let Some(existing) = self.instances.get(instance).cloned()
        {
            if request.member_id.is_empty() {
                return self.replace_static_member(token, existing, request, now_ms);
            }
            if request.member_id != existing {
                return answer_now(JoinOutcome::error(
                    GroupError::FencedInstanceId,
                    &request.member_id,
                ));
            }
        }

        let known = self.members.contains_key(&request.member_id);
        if !known {
            let pending = self.pending_ids.remove(&request.member_id).is_some();
            if !request.member_id.is_empty() && !pending {
                return answer_now(JoinOutcome::error(
                    GroupError::UnknownMemberId,
                    &request.member_id,
                ));
            }
            // Members that were given an id and have not joined with it yet hold a place too
            // (this one's own place, if it had one, was given back just above).
            if self.members.len() + self.pending_ids.len() >= self.limits.max_group_size {
                return answer_now(JoinOutcome::error(
                    GroupError::GroupMaxSizeReached,
                    &request.member_id,
                ));
            }
            if request.member_id.is_empty()
                && request.require_known_member_id
                && request.instance_id.is_none()
            {
                let member_id = Self::new_member_id(&request);
                let lapse = now_ms + i64::from(request.session_timeout_ms);
                self.pending_ids.insert(member_id.clone(), lapse);
                return answer_now(JoinOutcome::error(GroupError::MemberIdRequired, &member_id));
            }
            let member_id = if request.member_id.is_empty() {
                Self::new_member_id(&request)
            } else {
                request.member_id.clone()
            };
            self.add_member(member_id, &request, token, now_ms);
            self.prepare_rebalance(now_ms, &mut effects);
            self.maybe_complete_join(now_ms, &mut effects);
            return effects;
        }

        let member_id = request.member_id.clone();
        let changed = {
            let member = self.members.get_mut(&member_id).expect("checked above");
            let changed = member.protocols != request.protocols;
            member.protocols = request.protocols.clone();
            member.session_timeout_ms = request.session_timeout_ms;
            member.rebalance_timeout_ms = request.rebalance_timeout_ms;
            member.client_id = request.client_id.clone();
            member.client_host = request.client_host.clone();
            member.last_heard_ms = now_ms;
            changed
        };
        match self.state {
            GroupState::PreparingRebalance => {
                self.members
                    .get_mut(&member_id)
                    .expect("checked above")
                    .awaiting_join = Some(token);
                self.maybe_complete_join(now_ms, &mut effects);
            }
            GroupState::CompletingRebalance | GroupState::Stable
                if !changed && self.leader.as_deref() != Some(member_id.as_str()) =>
            {
                // Nothing changed: answer with the current generation, no rebalance.
                effects.push(Effect::Join(token, self.join_outcome(&member_id, false)));
            }
            _ => {
                self.members
                    .get_mut(&member_id)
                    .expect("checked above")
                    .awaiting_join = Some(token);
                self.prepare_rebalance(now_ms, &mut effects);
                self.maybe_complete_join(now_ms, &mut effects);
            }
        }
        effects
    }

    fn replace_static_member(
        &mut self,
        token: Token,
        old_id: String,
        request: JoinRequest,
        now_ms: i64,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(mut member) = self.members.remove(&old_id) else {
            self.instances
                .remove(request.instance_id.as_deref().unwrap_or_default());
            return self.join(token, request, now_ms);
        };
        // The old incarnation's pending requests are fenced.
        if let Some(waiting) = member.awaiting_join.take() {
            effects.push(Effect::Join(
                waiting,
                JoinOutcome::error(GroupError::FencedInstanceId, &old_id),
            ));
        }
        if let Some(waiting) = member.awaiting_sync.take() {
            effects.push(Effect::Sync(
                waiting,
                SyncOutcome::error(GroupError::FencedInstanceId),
            ));
        }
        let new_id = Self::new_member_id(&request);
        let changed = member.protocols != request.protocols;
        member.id = new_id.clone();
        member.protocols = request.protocols.clone();
        member.session_timeout_ms = request.session_timeout_ms;
        member.rebalance_timeout_ms = request.rebalance_timeout_ms;
        member.client_id = request.client_id.clone();
        member.client_host = request.client_host.clone();
        member.last_heard_ms = now_ms;
        if let Some(instance) = &request.instance_id {
            self.instances.insert(instance.clone(), new_id.clone());
        }
        if self.leader.as_deref() == Some(old_id.as_str()) {
            self.leader = Some(new_id.clone());
        }
        self.members.insert(new_id.clone(), member);
        if self.state == GroupState::Stable && !changed {
            // KIP-345: a restarted static member gets its place back without a rebalance.
            effects.push(Effect::Join(token, self.join_outcome(&new_id, false)));
        } else {
            self.members
                .get_mut(&new_id)
                .expect("inserted above")
                .awaiting_join = Some(token);
            self.prepare_rebalance(now_ms, &mut effects);
            self.maybe_complete_join(now_ms, &mut effects);
        }
        effects
    }

    fn add_member(&mut self, member_id: String, request: &JoinRequest, token: Token, now_ms: i64) {
        if self.members.is_empty() {
            self.protocol_type = Some(request.protocol_type.clone());
        }
        if let Some(instance) = &request.instance_id {
            self.instances.insert(instance.clone(), member_id.clone());
        }
        self.next_seq += 1;
        self.members.insert(
            member_id.clone(),
            Member {
                id: member_id,
                instance_id: request.instance_id.clone(),
                client_id: request.client_id.clone(),
                client_host: request.client_host.clone(),
                session_timeout_ms: request.session_timeout_ms,
                rebalance_timeout_ms: request.rebalance_timeout_ms,
                protocols: request.protocols.clone(),
                assignment: Bytes::new(),
                last_heard_ms: now_ms,
                joined_seq: self.next_seq,
                awaiting_join: Some(token),
                awaiting_sync: None,
            },
        );
    }

    fn max_rebalance_timeout_ms(&self) -> i64 {
        self.members
            .values()
            .map(|m| i64::from(m.rebalance_timeout_ms.max(m.session_timeout_ms)))
            .max()
            .unwrap_or(0)
    }

    /// Enters (or stays in) PreparingRebalance. Pending syncs of the old generation learn that
    /// a rebalance started.
    fn prepare_rebalance(&mut self, now_ms: i64, effects: &mut Vec<Effect>) {
        let was = self.state;
        if was == GroupState::PreparingRebalance {
            // A new member during an initial delay extends it, up to the rebalance timeout.
            if self.initial_delay_until_ms.is_some() {
                let extended = now_ms + self.limits.initial_rebalance_delay_ms;
                let cap = self.deadline_ms.unwrap_or(extended);
                self.initial_delay_until_ms = Some(extended.min(cap));
            }
            return;
        }
        for member in self.members.values_mut() {
            if let Some(waiting) = member.awaiting_sync.take() {
                effects.push(Effect::Sync(
                    waiting,
                    SyncOutcome::error(GroupError::RebalanceInProgress),
                ));
            }
        }
        self.state = GroupState::PreparingRebalance;
        self.deadline_ms = Some(now_ms + self.max_rebalance_timeout_ms());
        self.initial_delay_until_ms = (was == GroupState::Empty
            && self.limits.initial_rebalance_delay_ms > 0)
            .then(|| now_ms + self.limits.initial_rebalance_delay_ms);
    }

    fn maybe_complete_join(&mut self, now_ms: i64, effects: &mut Vec<Effect>) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        if self
            .initial_delay_until_ms
            .is_some_and(|until| now_ms < until)
        {
            return;
        }
        if self.members.values().all(|m| m.awaiting_join.is_some()) {
            self.complete_join(now_ms, effects);
        }
    }

    fn choose_protocol(&self) -> Option<String> {
        let first = self.members.values().next()?;
        let candidates: Vec<&String> = first
            .protocols
            .iter()
            .map(|(name, _)| name)
            .filter(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == *name))
            })
            .collect();
        // Each member votes for its most preferred candidate; ties go to the earlier candidate.
        let mut votes: Vec<(usize, &String)> = candidates.iter().map(|c| (0, *c)).collect();
        for member in self.members.values() {
            if let Some((name, _)) = member
                .protocols
                .iter()
                .find(|(n, _)| candidates.contains(&n))
                && let Some(entry) = votes.iter_mut().find(|(_, c)| *c == name)
            {
                entry.0 += 1;
            }
        }
        let best = votes.iter().map(|(count, _)| *count).max()?;
        votes
            .into_iter()
            .find(|(count, _)| *count == best)
            .map(|(_, name)| name.clone())
    }

    fn complete_join(&mut self, now_ms: i64, effects: &mut Vec<Effect>) {
        self.initial_delay_until_ms = None;
        self.generation += 1;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.protocol = None;
            self.protocol_type = None;
            self.leader = None;
            self.deadline_ms = None;
            return;
        }
        self.protocol = self.choose_protocol();
        if self
            .leader
            .as_ref()
            .is_none_or(|leader| !self.members.contains_key(leader))
        {
            self.leader = self
                .members
                .values()
                .min_by_key(|m| m.joined_seq)
                .map(|m| m.id.clone());
        }
        self.state = GroupState::CompletingRebalance;
        self.deadline_ms = Some(now_ms + self.max_rebalance_timeout_ms());
        let waiting: Vec<(String, Token)> = self
            .members
            .values_mut()
            .filter_map(|m| {
                m.last_heard_ms = now_ms;
                m.assignment = Bytes::new();
                m.awaiting_join.take().map(|token| (m.id.clone(), token))
            })
            .collect();
        for (member_id, token) in waiting {
            let is_leader = self.leader.as_deref() == Some(member_id.as_str());
            effects.push(Effect::Join(
                token,
                self.join_outcome(&member_id, is_leader),
            ));
        }
    }

    fn join_outcome(&self, member_id: &str, with_members: bool) -> JoinOutcome {
        let protocol = self.protocol.clone().unwrap_or_default();
        JoinOutcome {
            error: None,
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol.clone(),
            leader: self.leader.clone().unwrap_or_default(),
            member_id: member_id.to_owned(),
            members: if with_members {
                let mut members: Vec<&Member> = self.members.values().collect();
                members.sort_by_key(|m| m.joined_seq);
                members
                    .into_iter()
                    .map(|m| JoinedMember {
                        member_id: m.id.clone(),
                        instance_id: m.instance_id.clone(),
                        metadata: m.metadata_for(&protocol),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Checks that a member request names a current member of the current generation.
    fn check_member(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> Result<(), GroupError> {
        if let Some(instance) = instance_id
            && let Some(current) = self.instances.get(instance)
            && current != member_id
        {
            return Err(GroupError::FencedInstanceId);
        }
        if !self.members.contains_key(member_id) {
            return Err(GroupError::UnknownMemberId);
        }
        if generation != self.generation {
            return Err(GroupError::IllegalGeneration);
        }
        Ok(())
    }

    pub fn sync(&mut self, token: Token, request: SyncRequest, now_ms: i64) -> Vec<Effect> {
        let answer_now = |outcome: SyncOutcome| vec![Effect::Sync(token, outcome)];
        if let Err(error) = self.check_member(
            &request.member_id,
            request.instance_id.as_deref(),
            request.generation,
        ) {
            return answer_now(SyncOutcome::error(error));
        }
        if request
            .protocol_type
            .as_ref()
            .is_some_and(|t| Some(t) != self.protocol_type.as_ref())
            || request
                .protocol_name
                .as_ref()
                .is_some_and(|n| Some(n) != self.protocol.as_ref())
        {
            return answer_now(SyncOutcome::error(GroupError::InconsistentGroupProtocol));
        }
        let member_id = request.member_id.clone();
        if let Some(member) = self.members.get_mut(&member_id) {
            member.last_heard_ms = now_ms;
        }
        match self.state {
            GroupState::Empty | GroupState::PreparingRebalance => {
                answer_now(SyncOutcome::error(GroupError::RebalanceInProgress))
            }
            GroupState::Stable => answer_now(self.sync_outcome(&member_id)),
            GroupState::CompletingRebalance => {
                let mut effects = Vec::new();
                self.members
                    .get_mut(&member_id)
                    .expect("checked above")
                    .awaiting_sync = Some(token);
                if self.leader.as_deref() == Some(member_id.as_str()) {
                    for (target, assignment) in request.assignments {
                        if let Some(member) = self.members.get_mut(&target) {
                            member.assignment = assignment;
                        }
                    }
                    self.state = GroupState::Stable;
                    self.deadline_ms = None;
                    let waiting: Vec<(String, Token)> = self
                        .members
                        .values_mut()
                        .filter_map(|m| m.awaiting_sync.take().map(|t| (m.id.clone(), t)))
                        .collect();
                    for (id, waiting_token) in waiting {
                        effects.push(Effect::Sync(waiting_token, self.sync_outcome(&id)));
                    }
                }
                effects
            }
        }
    }

    fn sync_outcome(&self, member_id: &str) -> SyncOutcome {
        SyncOutcome {
            error: None,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol.clone(),
            assignment: self
                .members
                .get(member_id)
                .map(|m| m.assignment.clone())
                .unwrap_or_default(),
        }
    }

    pub fn heartbeat(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now_ms: i64,
    ) -> Result<(), GroupError> {
        if self.state == GroupState::Empty {
            return Err(GroupError::UnknownMemberId);
        }
        self.check_member(member_id, instance_id, generation)?;
        if let Some(member) = self.members.get_mut(member_id) {
            member.last_heard_ms = now_ms;
        }
        match self.state {
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    /// Members leave. Returns each member's result, and the effects on waiting requests.
    pub fn leave(
        &mut self,
        leaving: &[(String, Option<String>)],
        now_ms: i64,
    ) -> (Vec<Result<(), GroupError>>, Vec<Effect>) {
        let mut effects = Vec::new();
        let mut results = Vec::with_capacity(leaving.len());
        let mut removed_any = false;
        for (member_id, instance_id) in leaving {
            // A static member may leave by instance id alone.
            let member_id = match (member_id.is_empty(), instance_id) {
                (true, Some(instance)) => match self.instances.get(instance) {
                    Some(id) => id.clone(),
                    None => {
                        results.push(Err(GroupError::UnknownMemberId));
                        continue;
                    }
                },
                _ => member_id.clone(),
            };
            if let Some(instance) = instance_id
                && self
                    .instances
                    .get(instance)
                    .is_some_and(|id| *id != member_id)
            {
                results.push(Err(GroupError::FencedInstanceId));
                continue;
            }
            if self.remove_member(&member_id, GroupError::UnknownMemberId, &mut effects) {
                removed_any = true;
                results.push(Ok(()));
            } else {
                results.push(Err(GroupError::UnknownMemberId));
            }
        }
        if removed_any {
            self.after_membership_loss(now_ms, &mut effects);
        }
        (results, effects)
    }

    /// Removes a member, answering its waiting requests with `error`. True if it was there.
    /// The group is dropped (its coordinator moved): answers every waiting join and sync
    /// NOT_COORDINATOR, so the members look for the new coordinator.
    pub fn abandon(mut self) -> Vec<Effect> {
        let mut effects = Vec::new();
        let members: Vec<String> = self.members.keys().cloned().collect();
        for id in &members {
            self.remove_member(id, GroupError::NotCoordinator, &mut effects);
        }
        effects
    }

    fn remove_member(
        &mut self,
        member_id: &str,
        error: GroupError,
        effects: &mut Vec<Effect>,
    ) -> bool {
        let Some(member) = self.members.remove(member_id) else {
            return false;
        };
        if let Some(instance) = &member.instance_id
            && self
                .instances
                .get(instance)
                .is_some_and(|id| id == member_id)
        {
            self.instances.remove(instance);
        }
        if let Some(token) = member.awaiting_join {
            effects.push(Effect::Join(token, JoinOutcome::error(error, member_id)));
        }
        if let Some(token) = member.awaiting_sync {
            effects.push(Effect::Sync(token, SyncOutcome::error(error)));
        }
        true
    }

    fn after_membership_loss(&mut self, now_ms: i64, effects: &mut Vec<Effect>) {
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                if self.members.is_empty() {
                    self.generation += 1;
                    self.state = GroupState::Empty;
                    self.protocol = None;
                    self.protocol_type = None;
                    self.leader = None;
                    self.deadline_ms = None;
                } else {
                    self.prepare_rebalance(now_ms, effects);
                }
            }
            GroupState::PreparingRebalance => self.maybe_complete_join(now_ms, effects),
            GroupState::Empty => {}
        }
    }

    /// May a member commit offsets now? A group with no members accepts commits from
    /// "simple" consumers (generation -1, no member id).
    pub fn check_commit(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now_ms: i64,
    ) -> Result<(), GroupError> {
        if generation < 0 && member_id.is_empty() {
            return if self.members.is_empty() {
                Ok(())
            } else {
                Err(GroupError::UnknownMemberId)
            };
        }
        self.check_member(member_id, instance_id, generation)?;
        if self.state == GroupState::CompletingRebalance {
            return Err(GroupError::RebalanceInProgress);
        }
        if let Some(member) = self.members.get_mut(member_id) {
            member.last_heard_ms = now_ms;
        }
        Ok(())
    }

    /// Expires silent members, lapsed member ids and rebalance deadlines.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Effect> {
        let mut effects = Vec::new();
        self.pending_ids.retain(|_, lapse| *lapse > now_ms);
        // Members blocked in a join or sync cannot heartbeat; the rebalance deadline bounds them.
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| {
                m.awaiting_join.is_none()
                    && m.awaiting_sync.is_none()
                    && now_ms - m.last_heard_ms > i64::from(m.session_timeout_ms)
            })
            .map(|m| m.id.clone())
            .collect();
        if !expired.is_empty() {
            for id in &expired {
                tracing::info!(group = %self.id, member = %id, "member's session expired");
                self.remove_member(id, GroupError::UnknownMemberId, &mut effects);
            }
            self.after_membership_loss(now_ms, &mut effects);
        }
        if let Some(deadline) = self.deadline_ms
            && now_ms >= deadline
        {
            match self.state {
                GroupState::PreparingRebalance => {
                    let late: Vec<String> = self
                        .members
                        .values()
                        .filter(|m| m.awaiting_join.is_none())
                        .map(|m| m.id.clone())
                        .collect();
                    for id in &late {
                        tracing::info!(group = %self.id, member = %id, "member did not rejoin within the rebalance timeout");
                        self.remove_member(id, GroupError::UnknownMemberId, &mut effects);
                    }
                    self.complete_join(now_ms, &mut effects);
                }
                GroupState::CompletingRebalance => {
                    // The leader never sent assignments: drop the members that did not sync
                    // and start again.
                    let late: Vec<String> = self
                        .members
                        .values()
                        .filter(|m| m.awaiting_sync.is_none())
                        .map(|m| m.id.clone())
                        .collect();
                    for id in &late {
                        self.remove_member(id, GroupError::UnknownMemberId, &mut effects);
                    }
                    self.after_membership_loss(now_ms, &mut effects);
                }
                _ => self.deadline_ms = None,
            }
        }
        self.maybe_complete_join(now_ms, &mut effects);
        effects
    }

    pub fn describe(&self) -> GroupDescription {
        let protocol = self.protocol.clone().unwrap_or_default();
        let mut members: Vec<&Member> = self.members.values().collect();
        members.sort_by_key(|m| m.joined_seq);
        GroupDescription {
            group_id: self.id.clone(),
            state: self.state,
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            protocol: protocol.clone(),
            generation: self.generation,
            leader: self.leader.clone(),
            members: members
                .into_iter()
                .map(|m| MemberDescription {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: m.metadata_for(&protocol),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION_MS: i32 = 10_000;
    const REBALANCE_MS: i32 = 20_000;

    fn limits() -> GroupLimits {
        GroupLimits {
            initial_rebalance_delay_ms: 1_000,
            ..GroupLimits::default()
        }
    }

    fn join_request(member_id: &str, instance: Option<&str>, protocols: &[&str]) -> JoinRequest {
        JoinRequest {
            member_id: member_id.to_owned(),
            instance_id: instance.map(str::to_owned),
            client_id: "client".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout_ms: SESSION_MS,
            rebalance_timeout_ms: REBALANCE_MS,
            protocol_type: "consumer".into(),
            protocols: protocols
                .iter()
                .map(|p| ((*p).to_owned(), Bytes::from(format!("meta-{p}"))))
                .collect(),
            require_known_member_id: true,
            new_member_uuid: Uuid::new_v4(),
        }
    }

    fn join_outcomes(effects: &[Effect]) -> Vec<(Token, JoinOutcome)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Join(t, o) => Some((*t, o.clone())),
                Effect::Sync(..) => None,
            })
            .collect()
    }

    fn sync_outcomes(effects: &[Effect]) -> Vec<(Token, SyncOutcome)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Sync(t, o) => Some((*t, o.clone())),
                Effect::Join(..) => None,
            })
            .collect()
    }

    /// Joins a brand-new member through MEMBER_ID_REQUIRED; returns its member id.
    fn enter(group: &mut Group, token: Token, now: i64) -> (String, Vec<Effect>) {
        let first = group.join(token, join_request("", None, &["range"]), now);
        let outcome = &join_outcomes(&first)[0].1;
        assert_eq!(outcome.error, Some(GroupError::MemberIdRequired));
        let id = outcome.member_id.clone();
        let effects = group.join(token, join_request(&id, None, &["range"]), now);
        (id, effects)
    }

    #[test]
    fn pending_joins_count_toward_the_group_size_limit() {
        let mut group = Group::new(
            "g",
            GroupLimits {
                max_group_size: 2,
                ..limits()
            },
        );
        let (a, _) = enter(&mut group, 1, 0);
        // A second member is given an id and has not come back with it yet: it holds the
        // last place, so a third is refused at once.
        let first = group.join(2, join_request("", None, &["range"]), 10);
        let pending = join_outcomes(&first)[0].1.member_id.clone();
        let third = group.join(3, join_request("", None, &["range"]), 20);
        let refused = &join_outcomes(&third)[0].1;
        assert_eq!(refused.error, Some(GroupError::GroupMaxSizeReached));
        assert_eq!(refused.member_id, "");
        // The pending member takes the place it was given.
        let second = group.join(2, join_request(&pending, None, &["range"]), 30);
        assert!(
            join_outcomes(&second)
                .iter()
                .all(|(_, o)| o.error.is_none())
        );
        assert!(group.members.contains_key(&a) && group.members.contains_key(&pending));
    }

    #[test]
    fn three_members_form_a_generation_and_get_their_assignments() {
        let mut group = Group::new("g", limits());
        let (a, effects) = enter(&mut group, 1, 0);
        assert!(
            effects.is_empty(),
            "the initial delay holds the first rebalance"
        );
        let (b, _) = enter(&mut group, 2, 100);
        let (c, _) = enter(&mut group, 3, 200);
        assert!(group.tick(500).is_empty());
        let effects = group.tick(1_300);
        let outcomes = join_outcomes(&effects);
        assert_eq!(outcomes.len(), 3);
        for (_, outcome) in &outcomes {
            assert_eq!(outcome.error, None);
            assert_eq!(outcome.generation, 1);
            assert_eq!(outcome.leader, a);
            assert_eq!(outcome.protocol_name.as_deref(), Some("range"));
        }
        let leader = outcomes.iter().find(|(t, _)| *t == 1).unwrap();
        assert_eq!(leader.1.members.len(), 3);
        assert!(
            outcomes
                .iter()
                .filter(|(t, _)| *t != 1)
                .all(|(_, o)| o.members.is_empty())
        );
        assert_eq!(group.state(), GroupState::CompletingRebalance);

        // Followers wait for the leader's assignments.
        let sync = |member: &str, assignments: Vec<(String, Bytes)>| SyncRequest {
            member_id: member.to_owned(),
            instance_id: None,
            generation: 1,
            protocol_type: Some("consumer".into()),
            protocol_name: Some("range".into()),
            assignments,
        };
        assert!(group.sync(12, sync(&b, vec![]), 1_400).is_empty());
        let effects = group.sync(
            11,
            sync(
                &a,
                vec![
                    (a.clone(), Bytes::from("A")),
                    (b.clone(), Bytes::from("B")),
                    (c.clone(), Bytes::from("C")),
                ],
            ),
            1_500,
        );
        let synced = sync_outcomes(&effects);
        assert_eq!(synced.len(), 2);
        assert!(synced.contains(&(
            12,
            SyncOutcome {
                error: None,
                protocol_type: Some("consumer".into()),
                protocol_name: Some("range".into()),
                assignment: Bytes::from("B")
            }
        )));
        assert_eq!(group.state(), GroupState::Stable);
        // A late follower gets its assignment at once.
        let late = sync_outcomes(&group.sync(13, sync(&c, vec![]), 1_600));
        assert_eq!(late[0].1.assignment, Bytes::from("C"));
        assert_eq!(group.heartbeat(&b, None, 1, 2_000), Ok(()));
        assert_eq!(
            group.heartbeat(&b, None, 0, 2_000),
            Err(GroupError::IllegalGeneration)
        );
        assert_eq!(
            group.heartbeat("nobody", None, 1, 2_000),
            Err(GroupError::UnknownMemberId)
        );
    }

    fn stable_pair() -> (Group, String, String) {
        let mut group = Group::new("g", limits());
        let (a, _) = enter(&mut group, 1, 0);
        let (b, _) = enter(&mut group, 2, 0);
        group.tick(1_000);
        let sync = |member: &str, assignments| SyncRequest {
            member_id: member.to_owned(),
            instance_id: None,
            generation: 1,
            protocol_type: None,
            protocol_name: None,
            assignments,
        };
        group.sync(3, sync(&b, vec![]), 1_000);
        group.sync(
            4,
            sync(
                &a,
                vec![(a.clone(), Bytes::from("A")), (b.clone(), Bytes::from("B"))],
            ),
            1_000,
        );
        assert_eq!(group.state(), GroupState::Stable);
        (group, a, b)
    }

    #[test]
    fn a_silent_member_expires_and_the_rest_rebalance() {
        let (mut group, a, b) = stable_pair();
        // Only a keeps heartbeating.
        for now in (2_000..=11_000).step_by(1_000) {
            assert_eq!(group.heartbeat(&a, None, 1, now), Ok(()));
            group.tick(now);
        }
        group.tick(11_500);
        assert_eq!(group.state(), GroupState::PreparingRebalance);
        assert_eq!(
            group.heartbeat(&a, None, 1, 11_600),
            Err(GroupError::RebalanceInProgress)
        );
        assert_eq!(
            group.heartbeat(&b, None, 1, 11_600),
            Err(GroupError::UnknownMemberId)
        );
        let effects = group.join(5, join_request(&a, None, &["range"]), 11_700);
        let outcome = &join_outcomes(&effects)[0].1;
        assert_eq!(outcome.generation, 2);
        assert_eq!(outcome.members.len(), 1);
    }

    #[test]
    fn leaving_triggers_a_rebalance_and_a_member_that_does_not_rejoin_is_dropped() {
        let (mut group, a, b) = stable_pair();
        let (mut group2, a2, b2) = stable_pair();
        let (results, _) = group.leave(&[(b.clone(), None)], 2_000);
        assert_eq!(results, vec![Ok(())]);
        assert_eq!(group.state(), GroupState::PreparingRebalance);
        let effects = group.join(9, join_request(&a, None, &["range"]), 2_100);
        assert_eq!(join_outcomes(&effects)[0].1.generation, 2);
        // In group2, a rejoins; the other member keeps heartbeating but never rejoins.
        group2.join(9, join_request(&a2, None, &["range", "roundrobin"]), 2_000);
        assert_eq!(group2.state(), GroupState::PreparingRebalance);
        for now in (3_000..2_000 + i64::from(REBALANCE_MS)).step_by(3_000) {
            assert_eq!(
                group2.heartbeat(&b2, None, 1, now),
                Err(GroupError::RebalanceInProgress)
            );
            assert!(group2.tick(now).is_empty());
        }
        let effects = group2.tick(2_000 + i64::from(REBALANCE_MS));
        let outcome = &join_outcomes(&effects)[0].1;
        assert_eq!(outcome.error, None);
        assert_eq!(outcome.members.len(), 1);
        assert_eq!(group2.member_count(), 1);
    }

    #[test]
    fn a_restarted_static_member_takes_its_place_without_a_rebalance() {
        let mut group = Group::new("g", limits());
        let first = group.join(1, join_request("", Some("i-1"), &["range"]), 0);
        assert!(
            first.is_empty(),
            "static members skip MEMBER_ID_REQUIRED and wait for the delay"
        );
        let effects = group.tick(1_000);
        let old = join_outcomes(&effects)[0].1.member_id.clone();
        group.sync(
            2,
            SyncRequest {
                member_id: old.clone(),
                instance_id: Some("i-1".into()),
                generation: 1,
                protocol_type: None,
                protocol_name: None,
                assignments: vec![(old.clone(), Bytes::from("X"))],
            },
            1_000,
        );
        assert_eq!(group.state(), GroupState::Stable);
        // The process restarts and joins again with the same instance id and no member id.
        let effects = group.join(3, join_request("", Some("i-1"), &["range"]), 2_000);
        let outcome = &join_outcomes(&effects)[0].1;
        assert_ne!(outcome.member_id, old);
        assert_eq!(outcome.generation, 1, "no rebalance");
        assert_eq!(group.state(), GroupState::Stable);
        // The old member id is fenced.
        assert_eq!(
            group.heartbeat(&old, Some("i-1"), 1, 2_100),
            Err(GroupError::FencedInstanceId)
        );
        assert_eq!(
            group.heartbeat(&outcome.member_id, Some("i-1"), 1, 2_100),
            Ok(())
        );
    }

    #[test]
    fn commits_are_checked_against_membership() {
        let mut empty = Group::new("g", limits());
        assert_eq!(empty.check_commit("", None, -1, 0), Ok(()));
        let (mut group, a, _) = stable_pair();
        assert_eq!(group.check_commit(&a, None, 1, 2_000), Ok(()));
        assert_eq!(
            group.check_commit(&a, None, 0, 2_000),
            Err(GroupError::IllegalGeneration)
        );
        assert_eq!(
            group.check_commit("stranger", None, 1, 2_000),
            Err(GroupError::UnknownMemberId)
        );
        assert_eq!(
            group.check_commit("", None, -1, 2_000),
            Err(GroupError::UnknownMemberId)
        );
    }

    #[test]
    fn incompatible_protocols_and_bad_timeouts_are_refused() {
        let (mut group, _, _) = stable_pair();
        let effects = group.join(7, join_request("", None, &["sticky"]), 2_000);
        assert_eq!(
            join_outcomes(&effects)[0].1.error,
            Some(GroupError::InconsistentGroupProtocol)
        );
        let mut request = join_request("", None, &["range"]);
        request.session_timeout_ms = 10;
        assert_eq!(
            join_outcomes(&group.join(8, request, 2_000))[0].1.error,
            Some(GroupError::InvalidSessionTimeout)
        );
        let effects = group.join(9, join_request("made-up", None, &["range"]), 2_000);
        assert_eq!(
            join_outcomes(&effects)[0].1.error,
            Some(GroupError::UnknownMemberId)
        );
    }

    #[test]
    fn member_ids_are_never_reused_across_coordinator_restarts() {
        // The same client id (librdkafka's default is "rdkafka") before and after a restart.
        let mut before = Group::new("g", limits());
        let (stale, _) = enter(&mut before, 1, 0);
        let mut after = Group::new("g", limits());
        let (fresh, _) = enter(&mut after, 1, 0);
        assert_ne!(stale, fresh);
        for id in [&stale, &fresh] {
            let uuid = id.strip_prefix("client-").expect("client_id-UUID");
            assert!(Uuid::parse_str(uuid).is_ok(), "{id}");
        }
        // The member left over from before the restart is not taken for the newcomer.
        let effects = after.join(2, join_request(&stale, None, &["range"]), 100);
        assert_eq!(
            join_outcomes(&effects)[0].1.error,
            Some(GroupError::UnknownMemberId)
        );
        // A static member's id starts with its instance id, as in Kafka.
        after.join(3, join_request("", Some("i-7"), &["range"]), 100);
        let members = after.describe().members;
        let static_member = members
            .iter()
            .find(|m| m.instance_id.as_deref() == Some("i-7"))
            .expect("the static member joined");
        assert!(
            static_member.member_id.starts_with("i-7-"),
            "{}",
            static_member.member_id
        );
    }

    #[test]
    fn protocol_choice_follows_the_members_votes() {
        let mut group = Group::new(
            "g",
            GroupLimits {
                initial_rebalance_delay_ms: 0,
                ..limits()
            },
        );
        let mut a = join_request("", None, &["roundrobin", "range"]);
        a.require_known_member_id = false;
        let mut b = join_request("", None, &["range", "roundrobin"]);
        b.require_known_member_id = false;
        let mut c = join_request("", None, &["range"]);
        c.require_known_member_id = false;
        group.join(1, a, 0);
        group.join(2, b, 0);
        group.join(3, c, 0);
        let effects = group.tick(100);
        let outcomes = join_outcomes(&effects);
        assert!(
            outcomes
                .iter()
                .all(|(_, o)| o.protocol_name.as_deref() == Some("range"))
        );
    }
}
