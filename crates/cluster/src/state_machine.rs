//! openraft's state-machine storage ([`RaftStateMachine`]) around a deterministic
//! [`Machine`], with snapshots kept in one file.
//!
//! The machine lives in memory. What makes it durable is the Raft log plus the last snapshot:
//! on open the snapshot (if any) is loaded and openraft applies the committed entries after it
//! again. So apply must be deterministic — the same entries in the same order give the same
//! state on every node and on every restart — and [`Machine::apply`] gets nothing but the
//! entry's index and its command: no clock, no randomness, nothing node-local.
//!
//! # The `snapshot` file
//! `SLSNAP01`, then `[meta length u32 LE][meta JSON][data length u64 LE][data]
//! [crc32c u32 LE of everything after the magic]`. It is replaced atomically (written to
//! `snapshot.tmp`, synced, renamed, directory synced) on the blocking pool. A damaged snapshot
//! is an error naming the file; it is never skipped, because the log before it may already be
//! purged.

use std::fmt::Debug;
use std::io::{self, Cursor};

use crate::files::context;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{Stream, TryStreamExt};
use openraft::alias::{
    CommittedLeaderIdOf, LogIdOf, NodeIdOf, NodeOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf,
};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder, RaftTypeConfig};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

const MAGIC: &[u8; 8] = b"SLSNAP01";
/// The largest snapshot this store will read back.
const SNAPSHOT_BYTES_MAX: u64 = 1 << 30;

/// A replicated state machine: commands in, replies out, deterministically.
pub trait Machine: Default + Send + Sync + 'static {
    type Command: openraft::AppData;
    /// The default is the answer to Raft's own entries (blank, membership), whose writers
    /// (membership changes) wait for an answer too.
    type Reply: openraft::AppDataResponse + Default;

    /// Applies the committed command at log `index`. Must depend on nothing but `self`,
    /// `index` and `command`.
    fn apply(&mut self, index: u64, command: &Self::Command) -> Self::Reply;

    /// The whole state, for a snapshot.
    fn encode(&self) -> io::Result<Vec<u8>>;

    /// The state a snapshot holds.
    fn decode(bytes: &[u8]) -> io::Result<Self>;
}

/// A future an [`Observer`] returns.
pub type ObserverFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// What a node does with committed entries besides keeping its machine: carries out what they
/// mean outside Raft (the broker applying definitions to its own store). Called in log order,
/// after the machine applied the entry and before the next one; may take its time (Raft waits,
/// so a slow observer slows the group down rather than queueing without bound).
pub trait Observer<M: Machine>: Send + Sync + 'static {
    /// The entry at `index` was applied; `command` is `None` for Raft's own entries.
    fn applied<'a>(&'a self, index: u64, command: Option<&'a M::Command>) -> ObserverFuture<'a>;

    /// The machine was replaced by `machine`, a snapshot's state as of log `index`.
    fn installed<'a>(&'a self, index: u64, machine: &'a M) -> ObserverFuture<'a>;
}

/// What this store needs of a type config: openraft's own entry type carrying the machine's
/// commands, replies of the machine's type, and snapshot metadata that serde can write.
pub trait MachineTypes<M: Machine>:
    RaftTypeConfig<
        D = M::Command,
        R = M::Reply,
        Entry = openraft::Entry<
            CommittedLeaderIdOf<Self>,
            EntryPayload<M::Command, NodeIdOf<Self>, NodeOf<Self>>,
        >,
    >
{
}

impl<C, M> MachineTypes<M> for C
where
    M: Machine,
    C: RaftTypeConfig<
            D = M::Command,
            R = M::Reply,
            Entry = openraft::Entry<
                CommittedLeaderIdOf<C>,
                EntryPayload<M::Command, NodeIdOf<C>, NodeOf<C>>,
            >,
        >,
{
}

/// A group's state machine with its snapshots. Cheap to clone; every clone is the same one.
pub struct StateMachineStore<C: RaftTypeConfig, M> {
    shared: Arc<Shared<C, M>>,
}

impl<C: RaftTypeConfig, M> Clone for StateMachineStore<C, M> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C: RaftTypeConfig, M> Debug for StateMachineStore<C, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

struct Shared<C: RaftTypeConfig, M> {
    dir: PathBuf,
    state: Mutex<State<C, M>>,
    observer: std::sync::OnceLock<Arc<dyn Observer<M>>>,
    /// Held while the snapshot file is replaced: a snapshot built and one installed at once
    /// write one after the other, and an older one never replaces a newer.
    writing: tokio::sync::Mutex<()>,
}

struct State<C: RaftTypeConfig, M> {
    machine: M,
    last_applied: Option<LogIdOf<C>>,
    last_membership: StoredMembershipOf<C>,
    /// The last snapshot built or installed, as it is in the file.
    snapshot: Option<(SnapshotMetaOf<C>, Arc<Vec<u8>>)>,
}

impl<C, M> StateMachineStore<C, M>
where
    M: Machine,
    C: MachineTypes<M>,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
{
    /// Opens the state machine in `dir`: empty, or as the snapshot there left it. Blocking.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| context(e, "create", dir))?;
        let mut state = State {
            machine: M::default(),
            last_applied: None,
            last_membership: StoredMembershipOf::<C>::default(),
            snapshot: None,
        };
        if let Some((meta, data)) = read_snapshot::<C>(&dir.join("snapshot"))? {
            state.machine = M::decode(&data)?;
            state.last_applied = meta.last_log_id.clone();
            state.last_membership = meta.last_membership.clone();
            state.snapshot = Some((meta, Arc::new(data)));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                dir: dir.to_owned(),
                state: Mutex::new(state),
                observer: std::sync::OnceLock::new(),
                writing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Sets what is told about each entry applied from now on (once; later calls are ignored),
    /// and tells it the state the snapshot on disk holds, if there is one: call before Raft
    /// starts applying.
    pub async fn set_observer(&self, observer: Arc<dyn Observer<M>>) -> io::Result<()> {
        let snapshot = self.shared.state.lock().snapshot.clone();
        if let Some((meta, data)) = snapshot {
            let machine = M::decode(&data)?;
            let index = meta.last_log_id.as_ref().map_or(0, |id| id.index());
            observer.installed(index, &machine).await;
        }
        let _ = self.shared.observer.set(observer);
        Ok(())
    }

    /// Reads the machine (under a lock: keep `read` short, and never await in it).
    pub fn read<T>(&self, read: impl FnOnce(&M) -> T) -> T {
        read(&self.shared.state.lock().machine)
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogIdOf<C>> {
        self.shared.state.lock().last_applied.clone()
    }

    /// The index of the last entry the snapshot on disk covers, if there is one.
    pub fn snapshot_index(&self) -> Option<u64> {
        self.shared
            .state
            .lock()
            .snapshot
            .as_ref()
            .and_then(|(meta, _)| meta.last_log_id.as_ref().map(|id| id.index()))
    }
}

fn corrupt(path: &Path, reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt snapshot {}: {reason}", path.display()),
    )
}

fn encode_snapshot<C: RaftTypeConfig>(meta: &SnapshotMetaOf<C>, data: &[u8]) -> io::Result<Vec<u8>>
where
    SnapshotMetaOf<C>: Serialize,
{
    let meta =
        serde_json::to_vec(meta).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut bytes = Vec::with_capacity(MAGIC.len() + 16 + meta.len() + data.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&meta);
    bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
    bytes.extend_from_slice(data);
    let crc = crc32c::crc32c(&bytes[MAGIC.len()..]);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

fn read_snapshot<C: RaftTypeConfig>(path: &Path) -> io::Result<Option<(SnapshotMetaOf<C>, Vec<u8>)>>
where
    SnapshotMetaOf<C>: DeserializeOwned,
{
    let bytes = match std::fs::metadata(path) {
        Ok(meta) if meta.len() > SNAPSHOT_BYTES_MAX => {
            return Err(corrupt(path, "larger than any snapshot this store writes"));
        }
        Ok(_) => std::fs::read(path).map_err(|e| context(e, "read", path))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(context(e, "read", path)),
    };
    if bytes.len() < MAGIC.len() + 16 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt(
            path,
            "not a Sluice snapshot (bad magic or too short)",
        ));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(&body[MAGIC.len()..]) != crc {
        return Err(corrupt(path, "CRC mismatch"));
    }
    let rest = &body[MAGIC.len()..];
    let meta_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let meta = rest
        .get(4..4 + meta_len)
        .ok_or_else(|| corrupt(path, "metadata cut short"))?;
    let meta: SnapshotMetaOf<C> = serde_json::from_slice(meta)
        .map_err(|e| corrupt(path, &format!("undecodable metadata: {e}")))?;
    let data_at = 4 + meta_len;
    let len_bytes = rest
        .get(data_at..data_at + 8)
        .ok_or_else(|| corrupt(path, "data length cut short"))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(len_bytes);
    let data_len = u64::from_le_bytes(len) as usize;
    let data = rest
        .get(data_at + 8..)
        .filter(|data| data.len() == data_len)
        .ok_or_else(|| corrupt(path, "data length does not match the file"))?;
    Ok(Some((meta, data.to_vec())))
}

impl<C, M> StateMachineStore<C, M>
where
    M: Machine,
    C: MachineTypes<M>,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
{
    /// Writes `meta` and `data` as the current snapshot, durably, then remembers them.
    async fn keep_snapshot(&self, meta: SnapshotMetaOf<C>, data: Arc<Vec<u8>>) -> io::Result<()> {
        let _writing = self.shared.writing.lock().await;
        let newer_kept = {
            let state = self.shared.state.lock();
            state
                .snapshot
                .as_ref()
                .is_some_and(|(kept, _)| kept.last_log_id > meta.last_log_id)
        };
        if newer_kept {
            return Ok(());
        }
        let bytes = encode_snapshot::<C>(&meta, &data)?;
        let dir = self.shared.dir.clone();
        tokio::task::spawn_blocking(move || {
            crate::files::replace_atomically(&dir, "snapshot", &bytes)
        })
        .await
        .map_err(io::Error::other)??;
        self.shared.state.lock().snapshot = Some((meta, data));
        Ok(())
    }
}

impl<C, M> RaftSnapshotBuilder<C> for StateMachineStore<C, M>
where
    M: Machine,
    C: MachineTypes<M>,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
{
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, Self::SnapshotData>, io::Error> {
        let (meta, data) = {
            let state = self.shared.state.lock();
            let meta = SnapshotMetaOf::<C> {
                last_log_id: state.last_applied.clone(),
                last_membership: state.last_membership.clone(),
            };
            (meta, state.machine.encode()?)
        };
        let data = Arc::new(data);
        self.keep_snapshot(meta.clone(), Arc::clone(&data)).await?;
        Ok(SnapshotOf::<C, Self::SnapshotData> {
            meta,
            snapshot: Cursor::new(data.to_vec()),
        })
    }
}

impl<C, M> RaftStateMachine<C> for StateMachineStore<C, M>
where
    M: Machine,
    C: MachineTypes<M>,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
{
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        let state = self.shared.state.lock();
        Ok((state.last_applied.clone(), state.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + Send,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let reply = {
                let mut state = self.shared.state.lock();
                debug_assert!(
                    state.last_applied.as_ref() < Some(&log_id),
                    "entries are applied once, in order",
                );
                state.last_applied = Some(log_id.clone());
                match &entry.payload {
                    EntryPayload::Blank => M::Reply::default(),
                    EntryPayload::Normal(command) => state.machine.apply(log_id.index(), command),
                    EntryPayload::Membership(membership) => {
                        state.last_membership =
                            StoredMembershipOf::<C>::new(Some(log_id.clone()), membership.clone());
                        M::Reply::default()
                    }
                }
            };
            if let Some(observer) = self.shared.observer.get() {
                let command = match &entry.payload {
                    EntryPayload::Normal(command) => Some(command),
                    _ => None,
                };
                observer.applied(log_id.index(), command).await;
            }
            // Every entry with a waiting writer gets an answer, Raft's own included: a
            // membership change waits for it.
            if let Some(responder) = responder {
                responder.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<C>,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let machine = M::decode(&data)?;
        let data = Arc::new(data);
        self.keep_snapshot(meta.clone(), Arc::clone(&data)).await?;
        let index = meta.last_log_id.as_ref().map_or(0, |id| id.index());
        tracing::info!(
            dir = %self.shared.dir.display(),
            index,
            "installed a snapshot from the leader"
        );
        if let Some(observer) = self.shared.observer.get() {
            observer.installed(index, &machine).await;
        }
        let mut state = self.shared.state.lock();
        state.machine = machine;
        state.last_applied = meta.last_log_id.clone();
        state.last_membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<C, Self::SnapshotData>>, io::Error> {
        let state = self.shared.state.lock();
        Ok(state
            .snapshot
            .as_ref()
            .map(|(meta, data)| SnapshotOf::<C, Self::SnapshotData> {
                meta: meta.clone(),
                snapshot: Cursor::new(data.to_vec()),
            }))
    }
}
