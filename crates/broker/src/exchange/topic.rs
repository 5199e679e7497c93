//! Topic matching: binding keys are dot-separated words where `*` matches exactly one word and
//! `#` matches zero or more; they are compiled into a trie once, when bindings change, so
//! routing a message walks the trie instead of testing every pattern.
//!
//! A walk visits each (node, word position) pair at most once, so its cost is bounded by
//! nodes × words even for patterns such as `#.a.#.a.#` that would make a naive backtracking
//! matcher exponential.

use foldhash::{HashMap, HashMapExt};

#[derive(Debug, Clone)]
struct Node<D> {
    words: HashMap<String, usize>,
    star: Option<usize>,
    hash: Option<usize>,
    destinations: Vec<D>,
}

impl<D> Default for Node<D> {
    fn default() -> Self {
        Self {
            words: HashMap::new(),
            star: None,
            hash: None,
            destinations: Vec::new(),
        }
    }
}

/// A compiled set of topic bindings, each leading to a destination `D`.
#[derive(Debug, Clone)]
pub struct TopicTrie<D> {
    nodes: Vec<Node<D>>,
    has_hash: bool,
}

impl<D> Default for TopicTrie<D> {
    fn default() -> Self {
        Self {
            nodes: vec![Node::default()],
            has_hash: false,
        }
    }
}

impl<D: Clone> TopicTrie<D> {
    pub fn insert(&mut self, binding_key: &str, destination: D) {
        let mut node = 0;
        let mut previous_hash = false;
        for word in binding_key.split('.') {
            // "#.#" matches exactly what "#" does; collapsing keeps walks short.
            if word == "#" && previous_hash {
                continue;
            }
            previous_hash = word == "#";
            let next = match word {
                "*" => self.nodes[node].star,
                "#" => self.nodes[node].hash,
                _ => self.nodes[node].words.get(word).copied(),
            };
            node = match next {
                Some(next) => next,
                None => {
                    let index = self.nodes.len();
                    self.nodes.push(Node::default());
                    match word {
                        "*" => self.nodes[node].star = Some(index),
                        "#" => {
                            self.nodes[node].hash = Some(index);
                            self.has_hash = true;
                        }
                        _ => {
                            self.nodes[node].words.insert(word.to_owned(), index);
                        }
                    }
                    index
                }
            };
        }
        self.nodes[node].destinations.push(destination);
    }

    /// Calls `found` with every destination whose binding key matches `routing_key` (a
    /// destination bound by several matching keys is reported once per key).
    pub fn matches<'a>(&'a self, routing_key: &str, found: &mut dyn FnMut(&'a D)) {
        let words: Vec<&str> = routing_key.split('.').collect();
        let mut visited = if self.has_hash {
            vec![false; self.nodes.len() * (words.len() + 1)]
        } else {
            Vec::new()
        };
        self.walk(0, 0, &words, &mut visited, found);
    }

    fn walk<'a>(
        &'a self,
        node: usize,
        position: usize,
        words: &[&str],
        visited: &mut [bool],
        found: &mut dyn FnMut(&'a D),
    ) {
        if !visited.is_empty() {
            let slot = node * (words.len() + 1) + position;
            if visited[slot] {
                return;
            }
            visited[slot] = true;
        }
        let here = &self.nodes[node];
        if let Some(hash) = here.hash {
            // `#` may swallow zero or more of the remaining words.
            for next in position..=words.len() {
                self.walk(hash, next, words, visited, found);
            }
        }
        if position == words.len() {
            for destination in &here.destinations {
                found(destination);
            }
            return;
        }
        if let Some(&next) = here.words.get(words[position]) {
            self.walk(next, position + 1, words, visited, found);
        }
        if let Some(star) = here.star {
            self.walk(star, position + 1, words, visited, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(bindings: &[&str], key: &str) -> Vec<usize> {
        let mut trie = TopicTrie::default();
        for (index, binding) in bindings.iter().enumerate() {
            trie.insert(binding, index);
        }
        let mut out = Vec::new();
        trie.matches(key, &mut |d| out.push(*d));
        out.sort_unstable();
        out.dedup();
        out
    }

    #[test]
    fn stars_match_one_word_and_hashes_any_number() {
        let bindings = [
            "*.orange.*",
            "*.*.rabbit",
            "lazy.#",
            "#",
            "quick.#.fox",
            "a.#.#.b",
        ];
        assert_eq!(routes(&bindings, "quick.orange.rabbit"), vec![0, 1, 3]);
        assert_eq!(routes(&bindings, "lazy.orange.elephant"), vec![0, 2, 3]);
        assert_eq!(routes(&bindings, "quick.orange.fox"), vec![0, 3, 4]);
        assert_eq!(routes(&bindings, "lazy.brown.fox"), vec![2, 3]);
        assert_eq!(routes(&bindings, "lazy"), vec![2, 3]);
        assert_eq!(routes(&bindings, "quick.fox"), vec![3, 4]);
        assert_eq!(routes(&bindings, "quick.orange.male.rabbit"), vec![3]);
        assert_eq!(routes(&bindings, "a.b"), vec![3, 5]);
        assert_eq!(routes(&bindings, "a.x.y.b"), vec![3, 5]);
        assert_eq!(routes(&bindings, ""), vec![3]);
    }

    #[test]
    fn empty_words_and_exact_keys() {
        assert_eq!(routes(&["a..b"], "a..b"), vec![0]);
        assert_eq!(routes(&["a.*.b"], "a..b"), vec![0]);
        assert_eq!(routes(&["a.b"], "a.b.c"), Vec::<usize>::new());
        assert_eq!(routes(&[""], ""), vec![0]);
    }

    #[test]
    fn pathological_patterns_stay_cheap() {
        let pattern = vec!["#.a"; 60].join(".");
        let key = vec!["a"; 127].join(".");
        let started = std::time::Instant::now();
        let _ = routes(&[&pattern], &key);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
