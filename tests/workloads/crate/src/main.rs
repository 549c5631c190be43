use serde_json::{json, Value};
use std::thread;

fn main() {
    // Eight threads build their share of the rows: a multi-threaded program under --pids.
    let workers: Vec<_> = (0..8u64)
        .map(|part| {
            thread::spawn(move || -> Vec<Value> {
                (part * 1250..(part + 1) * 1250)
                    .map(|id| json!({ "id": id, "square": id * id }))
                    .collect()
            })
        })
        .collect();
    let rows: Vec<Value> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let text = serde_json::to_string(&rows).unwrap();
    let back: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(rows, back);
    let sum: u64 = back.iter().map(|row| row["square"].as_u64().unwrap()).sum();
    println!("rows {} sum {}", back.len(), sum);
}
