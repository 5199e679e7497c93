//! Moving a replicated partition (Kafka's AlterPartitionReassignments) as a Raft membership
//! change of its group.
//!
//! The controller commits where the partition is to go (`PartitionRecord::target`); every node
//! it is to be on opens a replica (an empty one waits for the log: it does not initialize the
//! group), and every replica runs [`drive`], which acts only while its replica leads and is
//! ready. The leader adds the target's new nodes as learners, waits until each holds
//! everything committed when it looked (a learner of a trimmed log first copies the retained
//! log: [`crate::partition::seed`]), changes the voters to the target (openraft's joint
//! consensus: a joint config, then the target's), removes any other learner, and — once the
//! membership is exactly the target, and only from a leader in it — commits
//! `CompleteReassignment` through the controller. Applying that makes the target the
//! partition's replicas; nodes no longer among them close their replica and remove its files.
//!
//! Every step reads the membership afresh, so a new leader after a failover (or after the old
//! one left the group) carries on where the last one stopped, and a cancelled or replaced
//! target is driven the same way. Safety is openraft's: the log never loses a committed entry
//! through a membership change, and a new node votes only once it is a voter.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use sluice_broker::MetadataCommand;
use sluice_broker::replication::Reassignment;

use crate::controller::{ControllerCommand, ControllerReply};
use crate::node::ControllerNode;
use crate::partition::replica::PartitionReplica;
use crate::placement::NodeId;

/// How often a replica looks at the reassignment's progress.
const STEP_EVERY: Duration = Duration::from_millis(200);
/// How long one membership change may take before it is looked at again (it may still
/// complete; the next step reads the membership afresh).
const CHANGE_WAIT: Duration = Duration::from_secs(30);
/// After a failed step.
const BACKOFF: Duration = Duration::from_secs(1);
/// A learner is caught up once it reached, within this long, what was committed when the
/// leader last looked (Raft's catch-up rounds: under steady writes it never holds everything
/// committed at the moment it is asked, but a round this short means it is close behind).
const LAST_ROUND: Duration = Duration::from_secs(1);

/// Each learner's current catch-up round: the commit index it is to reach, and since when.
type Rounds = BTreeMap<NodeId, (u64, std::time::Instant)>;

/// Where a step left the reassignment.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Its end is committed.
    Done,
    /// Not this replica's to do now (not leading, a learner catching up, a change under way).
    Waiting,
}

/// Carries `job`'s reassignment out whenever this replica leads, until its end is committed.
pub(crate) async fn drive(
    replica: Arc<PartitionReplica>,
    node: Arc<ControllerNode>,
    job: Reassignment,
) {
    let Some(order) = &job.target else {
        return;
    };
    let target: BTreeSet<NodeId> = order.iter().map(|&n| NodeId::from(n)).collect();
    let mut rounds = Rounds::new();
    let mut tick = tokio::time::interval(STEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if replica.ready_epoch().is_none() {
            continue;
        }
        match step(&replica, &node, &job, &target, &mut rounds).await {
            Ok(Progress::Done) => return,
            Ok(Progress::Waiting) => {}
            Err(error) => {
                tracing::info!(topic = job.topic, partition = job.partition, %error, "a reassignment step failed; trying again");
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}

/// One look at the group's membership, and the next change it needs.
async fn step(
    replica: &PartitionReplica,
    node: &ControllerNode,
    job: &Reassignment,
    target: &BTreeSet<NodeId>,
    rounds: &mut Rounds,
) -> Result<Progress, String> {
    let membership = replica.membership();
    let members: BTreeSet<NodeId> = membership
        .voters
        .union(&membership.learners)
        .copied()
        .collect();
    let joining: Vec<NodeId> = target.difference(&members).copied().collect();
    // Membership changes are writes: a quiet group wakes for them (not while blocked, so a
    // waiting move does not keep an idle group awake).
    replica.wake().await;
    if !joining.is_empty() {
        let addresses: BTreeMap<NodeId, String> = node.read_local(|s| {
            s.nodes
                .values()
                .map(|n| (n.id, n.cluster_addr.clone()))
                .collect()
        });
        for id in joining {
            let address = addresses
                .get(&id)
                .ok_or_else(|| format!("node {id} is not registered"))?;
            replica
                .raft()
                .add_learner(id, BasicNode::new(address.clone()), false)
                .await
                .map_err(|e| format!("adding node {id} as a learner: {e}"))?;
            tracing::info!(
                topic = job.topic,
                partition = job.partition,
                node = id,
                "added a learner; it catches up from the log"
            );
        }
        return Ok(Progress::Waiting);
    }
    if membership.joint || membership.voters != *target {
        // Each new voter first catches up: it reached what was committed at the start of
        // a round that took at most LAST_ROUND.
        for &id in target.difference(&membership.voters) {
            let Some((matched, committed)) = replica.progress(id) else {
                return Ok(Progress::Waiting);
            };
            let now = std::time::Instant::now();
            let (goal, since) = rounds.entry(id).or_insert((committed, now));
            if matched.is_none_or(|matched| matched < *goal) {
                return Ok(Progress::Waiting);
            }
            if since.elapsed() > LAST_ROUND && matched < Some(committed) {
                (*goal, *since) = (committed, now);
                return Ok(Progress::Waiting);
            }
        }
        change(
            replica,
            ChangeMembers::ReplaceAllVoters(target.clone()),
            "changing the voters",
        )
        .await?;
        return Ok(Progress::Waiting);
    }
    let leftover: BTreeSet<NodeId> = membership.learners.difference(target).copied().collect();
    if !leftover.is_empty() {
        change(
            replica,
            ChangeMembers::RemoveNodes(leftover),
            "removing learners",
        )
        .await?;
        return Ok(Progress::Waiting);
    }
    if !target.contains(&replica.node()) {
        // This leader left the group: openraft hands leadership to a voter, which commits
        // the end.
        return Ok(Progress::Waiting);
    }
    let Some(order) = job.target.clone() else {
        return Ok(Progress::Done);
    };
    let command = MetadataCommand::CompleteReassignment {
        name: job.topic.clone(),
        id: job.topic_id,
        partition: job.partition,
        replicas: order.clone(),
    };
    match node.propose(ControllerCommand::Metadata(command)).await {
        Ok(ControllerReply::Refused(reason)) => {
            // Another target replaced this one (its own drive takes over), or the end is
            // already committed.
            tracing::info!(topic = job.topic, partition = job.partition, %reason, "the reassignment's end was refused");
            Ok(Progress::Done)
        }
        Ok(_) => {
            tracing::info!(topic = job.topic, partition = job.partition, replicas = ?order, "committed the reassignment's end");
            Ok(Progress::Done)
        }
        Err(error) => Err(format!("committing the reassignment's end: {error}")),
    }
}

/// One membership change, waited for at most [`CHANGE_WAIT`].
async fn change(
    replica: &PartitionReplica,
    members: ChangeMembers<NodeId, BasicNode>,
    what: &str,
) -> Result<(), String> {
    match tokio::time::timeout(
        CHANGE_WAIT,
        replica.raft().change_membership(members, false),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("{what}: {error}")),
        Err(_) => Err(format!("{what}: not committed within {CHANGE_WAIT:?}")),
    }
}
