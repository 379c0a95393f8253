//! One JSON style for everything the CLI prints with `-o json`: camelCase keys, and times as
//! RFC 3339 strings (UTC; `null` when there is none). Types shared with the control plane and
//! the console keep Unix numbers on the wire; this is where they become RFC 3339.

use serde_json::Value;

/// RFC 3339 for Unix seconds; `null` for 0 (never).
pub fn time(unix_secs: u64) -> Value {
    match unix_secs {
        0 => Value::Null,
        s => Value::String(bulkhead_insight::rfc3339(s)),
    }
}

/// RFC 3339 with milliseconds for Unix milliseconds; `null` for 0.
pub fn time_millis(unix_millis: u64) -> Value {
    match unix_millis {
        0 => Value::Null,
        ms => {
            let secs = bulkhead_insight::rfc3339(ms / 1000);
            let base = secs.trim_end_matches('Z');
            Value::String(format!("{base}.{:03}Z", ms % 1000))
        }
    }
}

/// In `value` (an object, or an array of objects), replaces each numeric field named in
/// `seconds` with its RFC 3339 time, and each `(from, to)` of `millis` with a field `to`
/// holding the RFC 3339 time (with milliseconds) of `from`.
pub fn times(value: &mut Value, seconds: &[&str], millis: &[(&str, &str)]) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(|v| times(v, seconds, millis)),
        Value::Object(map) => {
            for key in seconds {
                if let Some(n) = map.get(*key).and_then(Value::as_u64) {
                    map.insert((*key).to_string(), time(n));
                }
            }
            for (from, to) in millis {
                if let Some(n) = map.remove(*from).and_then(|v| v.as_u64()) {
                    map.insert((*to).to_string(), time_millis(n));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_become_rfc3339() {
        let mut v = serde_json::json!([{"at": 86_400, "atMillis": 1_500, "other": 3}, {"at": 0}]);
        times(&mut v, &["at"], &[("atMillis", "time")]);
        assert_eq!(
            v,
            serde_json::json!([
                {"at": "1970-01-02T00:00:00Z", "time": "1970-01-01T00:00:01.500Z", "other": 3},
                {"at": null}
            ])
        );
    }
}
