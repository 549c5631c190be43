use rayon::prelude::*;
use serde_json::{json, Value};

fn main() {
    let rows: Vec<Value> = (0..10_000u64)
        .into_par_iter()
        .map(|id| json!({ "id": id, "square": id * id }))
        .collect();
    let text = serde_json::to_string(&rows).unwrap();
    let back: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(rows, back);
    let sum: u64 = back.iter().map(|row| row["square"].as_u64().unwrap()).sum();
    println!("rows {} sum {}", back.len(), sum);
}
