//! Each eBPF object the daemon ships carries exactly the maps `tapestry_common::map_names` lists
//! for it, under those names: a map renamed, added, or landing in the other object fails here.

use std::collections::BTreeSet;

use aya::EbpfLoader;
use tapestry_common::map_names;
use tapestry_node_daemon::datapath::{self, guest};

mod common;
use common::{PinDir, prerequisites};

/// The maps aya creates for `object`, by name. Names starting with '.' are the object's data
/// sections (`.rodata` holds the guest programs' constants), which aya loads as maps too; they
/// are neither declared maps nor pinned.
fn maps_of(object: &[u8]) -> BTreeSet<String> {
    assert!(
        !object.is_empty(),
        "built with AYA_BUILD_SKIP=1: there is no eBPF object to check"
    );
    let pins = PinDir::new("map-names");
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.path())
        .load(object)
        .expect("the object loads");
    ebpf.maps()
        .map(|(name, _)| name.to_owned())
        .filter(|name| !name.starts_with('.'))
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| n.to_string()).collect()
}

#[test]
fn the_load_balancer_object_carries_exactly_its_maps() {
    if !prerequisites() {
        return;
    }
    assert_eq!(maps_of(datapath::OBJECT), names(&map_names::ALL));
}

#[test]
fn the_guest_object_carries_exactly_its_maps() {
    if !prerequisites() {
        return;
    }
    assert_eq!(maps_of(guest::OBJECT), names(&map_names::GUEST));
}

#[test]
fn the_lists_have_no_duplicates_and_share_only_drops() {
    let all = names(&map_names::ALL);
    let guest = names(&map_names::GUEST);
    assert_eq!(all.len(), map_names::ALL.len(), "a duplicate in ALL");
    assert_eq!(guest.len(), map_names::GUEST.len(), "a duplicate in GUEST");
    // The one map both objects carry: every guest's drops count into the node's drops map.
    let shared: Vec<_> = all.intersection(&guest).collect();
    assert_eq!(shared, [map_names::DROPS]);
}
