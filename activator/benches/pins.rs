//! Pin-store cost: lookups of known pins in the sharded memory store against a single
//! `Mutex<HashMap>` baseline measured in the same run, with one and two threads; and this
//! process's resident memory growth for 1 000 000 pins. Prints figures; asserts nothing.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use activator::pins::{Lifetime, MemoryPins, Pin, PinKey, PinKind};

const KEYS: usize = 10_000;
const LOOKUPS_PER_THREAD: usize = 2_000_000;

fn main() {
    let scope: Arc<str> = Arc::from("default/counter");
    let keys: Arc<Vec<PinKey>> =
        Arc::new((0..KEYS).map(|i| PinKey::new(&scope, PinKind::Session, i.to_string().as_bytes())).collect());
    let pod = SocketAddr::from(([127, 0, 0, 1], 8080));
    let lifetime = Lifetime { ttl: Duration::from_secs(600), max_age: None };

    let store = Arc::new(MemoryPins::new(1_000_000));
    let locked = Arc::new(Mutex::new(HashMap::new()));
    for key in keys.iter() {
        store.write(key, None, Pin::session("counter-00001", pod), lifetime);
        locked.lock().unwrap().insert(key.clone(), Pin::session("counter-00001", pod));
    }

    println!("{:<28} {:>8} {:>14}", "lookup of a known pin", "threads", "ns/lookup");
    for threads in [1, 2] {
        let memory = per_lookup(threads, &keys, {
            let store = store.clone();
            move |k| store.get(k, &|_| lifetime).is_some()
        });
        let mutex = per_lookup(threads, &keys, {
            let locked = locked.clone();
            move |k| locked.lock().unwrap().get(k).cloned().is_some()
        });
        println!("{:<28} {threads:>8} {memory:>14.1}", "memory store (sharded LRU)");
        println!("{:<28} {threads:>8} {mutex:>14.1}", "Mutex<HashMap> baseline");
        println!("bench pins_get_ns_{threads}t {memory:.1} ns");
        println!("bench ratio_pins_get_vs_mutex_{threads}t {:.2} x", memory / mutex);
    }
    drop((store, locked));

    let before = resident_kib();
    // The bound is per shard (1/64 each), so hold a million with room for uneven shards.
    let million = MemoryPins::new(1_100_000);
    // Pins share their revision's name, as the request path makes them.
    let revision: Arc<str> = Arc::from("counter-00001");
    for i in 0..1_000_000u32 {
        let key = PinKey::new(&scope, PinKind::Session, &i.to_le_bytes());
        million.write(&key, None, Pin::session(revision.clone(), pod), lifetime);
    }
    let held = million.sweep();
    let grown = resident_kib().saturating_sub(before) as f64 / 1024.0;
    println!("bench pins_held {held} pins");
    println!("bench rss_growth_1000000_pins {grown:.1} MiB <= 150 MiB");
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Wall time per lookup with `threads` threads each doing `LOOKUPS_PER_THREAD` lookups, after
/// one untimed pass to warm caches.
fn per_lookup(threads: usize, keys: &Arc<Vec<PinKey>>, get: impl Fn(&PinKey) -> bool + Clone + Send + 'static) -> f64 {
    run(threads, keys, get.clone());
    let start = Instant::now();
    run(threads, keys, get);
    start.elapsed().as_nanos() as f64 / LOOKUPS_PER_THREAD as f64
}

fn run(threads: usize, keys: &Arc<Vec<PinKey>>, get: impl Fn(&PinKey) -> bool + Clone + Send + 'static) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (keys, get) = (keys.clone(), get.clone());
            std::thread::spawn(move || {
                let mut hits = 0usize;
                for i in 0..LOOKUPS_PER_THREAD {
                    hits += usize::from(get(black_box(&keys[(i * 7 + t) % keys.len()])));
                }
                assert_eq!(hits, LOOKUPS_PER_THREAD);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("bench thread");
    }
}
