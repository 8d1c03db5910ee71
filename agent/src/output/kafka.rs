//! Kafka destinations: the topic a record goes to, the key it carries and
//! the partition that key lands on.
//!
//! # The rule
//!
//! A Kafka topic is a log of many series, not one: a topic template may
//! hold `{agent}` but not `{series}`. The series is the record's **key**,
//! so that all of a series' records land in one partition, in order. The
//! outbox keeps the pair as one destination, `<topic>/<series>`: a topic
//! never holds `/` (Kafka's topic names are made of `A-Z a-z 0-9 . _ -`),
//! so the first `/` splits them and the series comes back exactly, whatever
//! it holds.
//!
//! The partition of a key is Kafka's own default partitioner's:
//! `(murmur2(key) & 0x7fffffff) % partitions`, so a series lands where a
//! Java or librdkafka (`murmur2_random`) producer would put the same key.

/// The destination of a record for `series`: the topic of `template` (its
/// `{agent}` filled in) and the series, as the outbox keeps them.
pub fn render(template: &str, agent: &str, series: &str) -> String {
    format!("{}/{series}", template.replace("{agent}", agent))
}

/// A destination's topic and key, or `None` when it holds no `/` (a record
/// written for another kind of uplink).
pub fn split(destination: &str) -> Option<(&str, &str)> {
    destination.split_once('/')
}

/// Why no Kafka cluster takes `topic`, or `None`: it is empty, longer than
/// 249 characters, `.` or `..`, or holds a character other than ASCII
/// letters, digits, `.`, `_` and `-`.
pub fn topic_problem(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("an empty topic")
    } else if topic.len() > 249 {
        Some("longer than 249 characters")
    } else if topic == "." || topic == ".." {
        Some("'.' and '..' are not topic names")
    } else if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("a character other than A-Z, a-z, 0-9, '.', '_' and '-'")
    } else {
        None
    }
}

/// Checks a topic template for the agent `agent`: no `{series}` (the series
/// is the key), and the topic it gives is one Kafka takes.
pub fn check_template(template: &str, agent: &str) -> Result<(), String> {
    if template.contains("{series}") {
        return Err(
            "must not contain {series}: a Kafka topic holds many series, and the series is each record's key"
                .into(),
        );
    }
    let topic = template.replace("{agent}", agent);
    match topic_problem(&topic) {
        Some(p) => Err(format!(
            "gives the topic {topic:?}, which Kafka refuses: {p}"
        )),
        None => Ok(()),
    }
}

/// Kafka's `Utils.murmur2`: the hash its default partitioner applies to a
/// record's key.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, &b) in rest.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition (of `partitions`, at least 1) that Kafka's default
/// partitioner gives `key`.
pub fn partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_gives_what_kafkas_own_tests_pin() {
        // Apache Kafka's UtilsTest.testMurmur2: the Java implementation's
        // results, so a key hashes here as it does in a Java producer.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want, "{}", String::from_utf8_lossy(key));
        }
        assert!((0..7).contains(&partition(b"21", 7)));
        assert_eq!(partition(b"21", 1), 0);
    }

    #[test]
    fn a_destination_splits_back_into_topic_and_series_whatever_the_series_holds() {
        for series in ["s-1", "a/b/../c", "#", "x y", "", "naïve/ü"] {
            let d = render("sluice.{agent}.agg", "gw-1", series);
            assert_eq!(split(&d), Some(("sluice.gw-1.agg", series)));
        }
        assert_eq!(split("sluice.agg.no-slash"), None);
    }

    #[test]
    fn templates_kafka_would_refuse_are_refused_at_load() {
        assert!(check_template("sluice.aggregates", "gw").is_ok());
        assert!(check_template("sluice.{agent}.agg", "gw_1").is_ok());
        let e = check_template("sluice.{series}", "gw").unwrap_err();
        assert!(e.contains("key"), "{e}");
        let e = check_template("sluice/{agent}", "gw").unwrap_err();
        assert!(e.contains("\"sluice/gw\""), "{e}");
        assert!(check_template("sluice.{agent}", "gw 1").is_err());
        assert!(check_template("{agent}", "..").is_err());
        assert!(check_template("", "gw").is_err());
        assert!(check_template(&"t".repeat(250), "gw").is_err());
        assert!(check_template(&"t".repeat(249), "gw").is_ok());
    }
}
