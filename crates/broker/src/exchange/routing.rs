//! The routing table of one virtual host: every exchange compiled for matching, and every live
//! queue, as an immutable snapshot. The controller builds a new table after each change;
//! publishers route against whichever table they hold, without locks.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use super::headers::HeadersMatch;
use super::topic::TopicTrie;
use super::{BindingRecord, Destination, ExchangeKind, ExchangeRecord};
use crate::message::value::FieldTable;
use crate::queue::Queue;

#[derive(Debug, Clone)]
enum Target {
    Queue(Arc<Queue>),
    Exchange(Arc<str>),
}

#[derive(Debug)]
enum Matcher {
    Direct(HashMap<String, Vec<Target>>),
    Fanout(Vec<Target>),
    Topic(TopicTrie<Target>),
    Headers(Vec<(HeadersMatch, Target)>),
}

#[derive(Debug)]
struct CompiledExchange {
    record: Arc<ExchangeRecord>,
    alternate: Option<Arc<str>>,
    matcher: Matcher,
    binding_count: usize,
}

/// Where a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// The exchange it was published to does not exist.
    ExchangeNotFound,
}

/// A virtual host's exchanges and queues, compiled.
#[derive(Debug, Default)]
pub struct RoutingTable {
    exchanges: HashMap<String, CompiledExchange>,
    queues: HashMap<String, Arc<Queue>>,
}

impl RoutingTable {
    pub fn build<'a>(
        exchanges: impl IntoIterator<Item = &'a ExchangeRecord>,
        bindings: impl IntoIterator<Item = &'a BindingRecord>,
        queues: HashMap<String, Arc<Queue>>,
    ) -> Self {
        let mut compiled: HashMap<String, CompiledExchange> = exchanges
            .into_iter()
            .map(|record| {
                let matcher = match record.kind {
                    ExchangeKind::Direct => Matcher::Direct(HashMap::new()),
                    ExchangeKind::Fanout => Matcher::Fanout(Vec::new()),
                    ExchangeKind::Topic => Matcher::Topic(TopicTrie::default()),
                    ExchangeKind::Headers => Matcher::Headers(Vec::new()),
                };
                (
                    record.name.clone(),
                    CompiledExchange {
                        alternate: record.alternate_exchange().map(Arc::from),
                        record: Arc::new(record.clone()),
                        matcher,
                        binding_count: 0,
                    },
                )
            })
            .collect();
        for binding in bindings {
            let target = match &binding.destination {
                Destination::Queue(name) => match queues.get(name) {
                    Some(queue) => Target::Queue(Arc::clone(queue)),
                    None => continue,
                },
                Destination::Exchange(name) => Target::Exchange(Arc::from(name.as_str())),
            };
            let Some(exchange) = compiled.get_mut(&binding.source) else {
                continue;
            };
            exchange.binding_count += 1;
            match &mut exchange.matcher {
                Matcher::Direct(map) => map
                    .entry(binding.routing_key.clone())
                    .or_default()
                    .push(target),
                Matcher::Fanout(targets) => targets.push(target),
                Matcher::Topic(trie) => trie.insert(&binding.routing_key, target),
                Matcher::Headers(list) => {
                    list.push((HeadersMatch::new(&binding.arguments), target))
                }
            }
        }
        Self {
            exchanges: compiled,
            queues,
        }
    }

    pub fn exchange(&self, name: &str) -> Option<&Arc<ExchangeRecord>> {
        self.exchanges.get(name).map(|e| &e.record)
    }

    pub fn queue(&self, name: &str) -> Option<&Arc<Queue>> {
        self.queues.get(name)
    }

    pub fn queues(&self) -> impl Iterator<Item = &Arc<Queue>> {
        self.queues.values()
    }

    /// Bindings whose source is `exchange`.
    pub fn binding_count(&self, exchange: &str) -> usize {
        self.exchanges.get(exchange).map_or(0, |e| e.binding_count)
    }

    /// Routes a message published to `exchange` with `routing_keys` (its routing key, then any
    /// CC/BCC keys) and `headers`, adding each destination queue to `out` once.
    pub fn route(
        &self,
        exchange: &str,
        routing_keys: &[&str],
        headers: Option<&FieldTable>,
        out: &mut Vec<Arc<Queue>>,
    ) -> Result<(), RouteError> {
        if exchange.is_empty() {
            for key in routing_keys {
                if let Some(queue) = self.queues.get(*key) {
                    push_unique(out, queue);
                }
            }
            return Ok(());
        }
        if !self.exchanges.contains_key(exchange) {
            return Err(RouteError::ExchangeNotFound);
        }
        let mut pending: Vec<&str> = vec![exchange];
        let mut seen: Vec<&str> = Vec::new();
        while let Some(name) = pending.pop() {
            if seen.contains(&name) {
                continue;
            }
            seen.push(name);
            let Some(compiled) = self.exchanges.get(name) else {
                continue;
            };
            let mut routed_anywhere = false;
            match &compiled.matcher {
                Matcher::Direct(map) => {
                    for key in routing_keys {
                        for target in map.get(*key).into_iter().flatten() {
                            visit(target, out, &mut pending, &mut routed_anywhere);
                        }
                    }
                }
                Matcher::Fanout(targets) => {
                    for target in targets {
                        visit(target, out, &mut pending, &mut routed_anywhere);
                    }
                }
                Matcher::Topic(trie) => {
                    for key in routing_keys {
                        trie.matches(key, &mut |target| {
                            visit(target, out, &mut pending, &mut routed_anywhere)
                        });
                    }
                }
                Matcher::Headers(list) => {
                    for (matcher, target) in list {
                        if matcher.matches(headers) {
                            visit(target, out, &mut pending, &mut routed_anywhere);
                        }
                    }
                }
            }
            if !routed_anywhere && let Some(alternate) = &compiled.alternate {
                pending.push(alternate);
            }
        }
        Ok(())
    }
}

/// Follows one binding: a queue joins the result, an exchange joins the walk.
fn visit<'t>(
    target: &'t Target,
    out: &mut Vec<Arc<Queue>>,
    pending: &mut Vec<&'t str>,
    routed_anywhere: &mut bool,
) {
    *routed_anywhere = true;
    match target {
        Target::Queue(queue) => push_unique(out, queue),
        Target::Exchange(next) => pending.push(next),
    }
}

fn push_unique(out: &mut Vec<Arc<Queue>>, queue: &Arc<Queue>) {
    if !out.iter().any(|q| Arc::ptr_eq(q, queue)) {
        out.push(Arc::clone(queue));
    }
}
