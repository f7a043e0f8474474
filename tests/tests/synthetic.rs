//! The synthetic ICR generator of the test kit (`icr_test_kit::synthetic`),
//! which the benches, the crash test's writer and the ClickHouse lab's
//! gateways share, makes plausible records.
use icr::record::Icr;
use icr_test_kit::synthetic::{Generator, Options};

#[test]
fn records_are_plausible_and_closed_in_order() {
    let mut generator = Generator::new(1, Options::default());
    let records: Vec<Icr> = (0..10_000).map(|_| generator.next_record()).collect();
    assert!(records.windows(2).all(|w| w[0].end <= w[1].end));
    assert!(records.iter().all(|r| r.start <= r.end && r.public.is_some()));
    let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), records.len());
    let named = records.iter().filter(|r| r.service.is_some()).count();
    assert!((7_000..9_500).contains(&named), "{named}");
    // Zipf: the most popular name is far more common than the median.
    let top = records.iter().filter(|r| r.service.as_ref().is_some_and(|s| s.name == Generator::name(1))).count();
    assert!(top > 100, "{top}");
}
