//! The demo dataset: a few thousand nested JSON events, generated deterministically so every
//! fresh start shows the same data.

use serde_json::{Value, json};

pub const DEMO_EVENTS: usize = 5_000;

/// A small deterministic generator (xorshift), so the demo needs no data file and no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

pub fn events() -> Vec<Value> {
    let mut rng = Rng(0x005e_edba_5a17);
    let kinds = ["click", "view", "purchase", "signup", "search"];
    let cities = ["London", "Paris", "Berlin", "Lisbon", "Oslo", "Madrid", "Rome", "Dublin"];
    let devices = ["ios", "android", "web"];
    let words =
        ["fast", "fresh", "green", "blue", "shoes", "lamp", "coffee", "book", "phone", "chair", "garden", "winter"];
    // 2026-11-01T00:00:00Z in milliseconds, one event every ~40 s.
    let start_ms: i64 = 1_793_491_200_000;
    (0..DEMO_EVENTS)
        .map(|i| {
            let kind = rng.pick(&kinds);
            let user = rng.next() % 500;
            let price =
                if kind == "purchase" { Value::from((rng.next() % 20_000) as f64 / 100.0) } else { Value::Null };
            let query: String = (0..3).map(|_| rng.pick(&words)).collect::<Vec<_>>().join(" ");
            json!({
                "_id": format!("e{i:05}"),
                "_event_time": start_ms + (i as i64) * 40_000,
                "kind": kind,
                "user_id": format!("u{user:03}"),
                "price": price,
                "device": {"os": rng.pick(&devices), "version": (rng.next() % 5) as i64 + 10},
                "geo": {"city": rng.pick(&cities), "lat": 40.0 + (rng.next() % 2000) as f64 / 100.0},
                "tags": [rng.pick(&words), rng.pick(&words)],
                "text": format!("user {user} did {kind}: {query}"),
            })
        })
        .collect()
}
