//! Secondary indexes over the watch caches, so that a reconcile and a Guest's mapping to its
//! Services touch the few objects concerned instead of scanning every cache: at 10,000 Services
//! and 50,000 Guests in one namespace, scanning made a full resync quadratic.
//!
//! Each index maps keys to the objects that carry them, and is fed the same watch events as the
//! reflector store beside it (including its re-list: a fresh index is built from `Init` to
//! `InitDone` and then swapped in, as the store does). Lookups return candidates by name; callers
//! fetch the objects from the store and check them, so an index entry never decides anything on
//! its own. That is also why keys are kept as 64-bit hashes (a collision only adds a candidate)
//! and each name once, shared: at 50,000 Guests the index stays a small part of the cache.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, RwLock},
};

use kube::{Resource, ResourceExt, runtime::watcher};

/// The keys an object is indexed under.
pub type KeysOf<K> = fn(&K) -> Vec<String>;

/// `(namespace, name)` of an indexed object.
pub type Name = (String, String);

/// A key as the index keeps it.
fn hash_key(key: &str) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<u64, HashSet<Arc<Name>>>,
    keys_of: HashMap<Arc<Name>, Vec<u64>>,
}

impl Inner {
    fn insert(&mut self, name: Name, keys: &[String]) {
        self.remove(&name);
        if keys.is_empty() {
            return;
        }
        let name = Arc::new(name);
        let mut hashes: Vec<u64> = keys.iter().map(|k| hash_key(k)).collect();
        hashes.sort_unstable();
        hashes.dedup();
        for h in &hashes {
            self.by_key.entry(*h).or_default().insert(name.clone());
        }
        self.keys_of.insert(name, hashes);
    }

    fn remove(&mut self, name: &Name) {
        let Some((name, hashes)) = self.keys_of.remove_entry(name) else {
            return;
        };
        for h in hashes {
            if let Some(set) = self.by_key.get_mut(&h) {
                set.remove(&name);
                if set.is_empty() {
                    self.by_key.remove(&h);
                }
            }
        }
    }

    fn get(&self, key: &str) -> Option<&HashSet<Arc<Name>>> {
        self.by_key.get(&hash_key(key))
    }
}

#[derive(Default)]
struct State {
    live: Inner,
    /// Being rebuilt by a (re)list; swapped in at `InitDone`.
    building: Option<Inner>,
}

/// A key -> objects index of one kind, kept in step with a watch stream.
pub struct Index<K> {
    keys_of: KeysOf<K>,
    state: Arc<RwLock<State>>,
}

impl<K> Clone for Index<K> {
    fn clone(&self) -> Self {
        Index {
            keys_of: self.keys_of,
            state: self.state.clone(),
        }
    }
}

fn name_of<K: Resource>(obj: &K) -> Name {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

impl<K: Resource> Index<K> {
    pub fn new(keys_of: KeysOf<K>) -> Index<K> {
        Index {
            keys_of,
            state: Arc::default(),
        }
    }

    /// Applies one watch event, as `reflector::store::Writer::apply_watcher_event` does.
    pub fn apply_watcher_event(&self, event: &watcher::Event<K>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(o) => state.live.insert(name_of(o), &(self.keys_of)(o)),
            watcher::Event::Delete(o) => state.live.remove(&name_of(o)),
            watcher::Event::Init => state.building = Some(Inner::default()),
            watcher::Event::InitApply(o) => {
                let keys = (self.keys_of)(o);
                state
                    .building
                    .get_or_insert_with(Inner::default)
                    .insert(name_of(o), &keys);
            }
            watcher::Event::InitDone => {
                if let Some(built) = state.building.take() {
                    state.live = built;
                }
            }
        }
    }

    /// For a stream's `.inspect(..)`: applies every successful event.
    pub fn feeder(&self) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
        let index = self.clone();
        move |ev| {
            if let Ok(ev) = ev {
                index.apply_watcher_event(ev);
            }
        }
    }

    /// The objects indexed under `key` (and, rarely, a key with the same hash).
    pub fn get(&self, key: &str) -> Vec<Arc<Name>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .live
            .get(key)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The objects under the key of `keys` with the fewest objects (an intersection's
    /// candidates: every object under all of them is among these); `None` for no keys.
    pub fn smallest(&self, keys: &[String]) -> Option<Vec<Arc<Name>>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let empty = HashSet::new();
        keys.iter()
            .map(|k| state.live.get(k).unwrap_or(&empty))
            .min_by_key(|s| s.len())
            .map(|s| s.iter().cloned().collect())
    }

    /// The objects under any of `keys`, each once.
    pub fn union<'a>(&self, keys: impl IntoIterator<Item = &'a String>) -> HashSet<Arc<Name>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut out = HashSet::new();
        for k in keys {
            if let Some(s) = state.live.get(k) {
                out.extend(s.iter().cloned());
            }
        }
        out
    }
}

/// The key of a label pair in a namespace (a label key may hold `/`, so NUL separates).
pub fn label_key(namespace: &str, key: &str, value: &str) -> String {
    format!("{namespace}\0{key}\0{value}")
}

/// The key of a name in a namespace.
pub fn name_key(namespace: &str, name: &str) -> String {
    format!("{namespace}\0{name}")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;

    fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn by_label(o: &ConfigMap) -> Vec<String> {
        o.labels()
            .iter()
            .map(|(k, v)| label_key("ns", k, v))
            .collect()
    }

    fn names(v: Vec<Arc<Name>>) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|n| n.1.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn follows_applies_deletes_and_relists() {
        use watcher::Event;
        let idx = Index::new(by_label);
        let web = label_key("ns", "app", "web");
        let db = label_key("ns", "app", "db");
        idx.apply_watcher_event(&Event::Init);
        idx.apply_watcher_event(&Event::InitApply(cm("a", &[("app", "web")])));
        // Not live before InitDone.
        assert!(idx.get(&web).is_empty());
        idx.apply_watcher_event(&Event::InitDone);
        assert_eq!(names(idx.get(&web)), ["a"]);

        idx.apply_watcher_event(&Event::Apply(cm("b", &[("app", "web"), ("t", "1")])));
        assert_eq!(names(idx.get(&web)), ["a", "b"]);
        // A label change moves the object.
        idx.apply_watcher_event(&Event::Apply(cm("a", &[("app", "db")])));
        assert_eq!(names(idx.get(&web)), ["b"]);
        assert_eq!(names(idx.get(&db)), ["a"]);
        assert_eq!(
            names(
                idx.smallest(&[web.clone(), label_key("ns", "t", "1")])
                    .unwrap()
            ),
            ["b"]
        );
        assert_eq!(
            names(idx.union(&[web.clone(), db.clone()]).into_iter().collect()),
            ["a", "b"]
        );
        idx.apply_watcher_event(&Event::Delete(cm("b", &[])));
        assert!(idx.get(&web).is_empty());

        // A re-list that no longer has "a": gone once it is done.
        idx.apply_watcher_event(&Event::Init);
        idx.apply_watcher_event(&Event::InitApply(cm("c", &[("app", "web")])));
        assert_eq!(names(idx.get(&db)), ["a"]);
        idx.apply_watcher_event(&Event::InitDone);
        assert!(idx.get(&db).is_empty());
        assert_eq!(names(idx.get(&web)), ["c"]);
    }
}
