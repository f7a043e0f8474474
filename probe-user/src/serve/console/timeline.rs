//! The answer's timeline, drawn by the server as SVG (no script, nothing
//! fetched): one row per device (questions 1 and 3) or per service
//! (question 2) across the window, the capture gaps shaded across all rows.
use chrono::{DateTime, Utc};
use maud::{Markup, html};

use crate::{
    record::Icr,
    store::{gaps::Gap, rollup::ServiceRow},
};

const WIDTH: f64 = 1100.0;
const LABEL: f64 = 260.0;
const ROW: f64 = 22.0;
const AXIS: f64 = 24.0;
/// Rows drawn at most; the table has them all.
const MAX_ROWS: usize = 60;

/// One row: a label and its marks (start, end, bytes).
struct Row {
    label: String,
    marks: Vec<(DateTime<Utc>, DateTime<Utc>, u64, String)>,
}

/// Questions 1 and 3: a row per device, a mark per connection (its span,
/// and a dot at its start sized by its bytes).
pub fn of_records(records: &[Icr], from: DateTime<Utc>, to: DateTime<Utc>, gaps: &[Gap]) -> Markup {
    let mut rows: Vec<Row> = Vec::new();
    for record in records {
        let device = record
            .device
            .mac
            .clone()
            .or_else(|| record.device.ip.map(|ip| ip.to_string()))
            .unwrap_or_else(|| "-".into());
        let label = match &record.device.subscriber {
            Some(subscriber) => format!("{device} ({subscriber})"),
            None => device,
        };
        let what = record
            .service
            .as_ref()
            .map_or_else(|| format!("{}:{}", record.remote.ip, record.remote.port), |s| s.name.clone());
        let mark = (record.start, record.end, record.bytes_up + record.bytes_down, what);
        match rows.iter_mut().find(|row| row.label == label) {
            Some(row) => row.marks.push(mark),
            None => rows.push(Row { label, marks: vec![mark] }),
        }
    }
    draw(&rows, from, to, gaps)
}

/// Question 2: a row per service, from its first use to its last; its
/// connections and bytes are the dots' title and size (the answer counts
/// them per service, it does not list them).
pub fn of_services(services: &[ServiceRow], from: DateTime<Utc>, to: DateTime<Utc>, gaps: &[Gap]) -> Markup {
    let rows: Vec<Row> = services
        .iter()
        .filter_map(|service| {
            let time = |text: &str| DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc));
            let (first, last) = (time(&service.first)?, time(&service.last)?);
            let name = service.name.clone().unwrap_or_else(|| service.remote.clone());
            let what = format!("{} connections, {} bytes", service.connections, service.bytes);
            Some(Row { label: name, marks: vec![(first, last, service.bytes, what)] })
        })
        .collect();
    draw(&rows, from, to, gaps)
}

/// The span the timeline draws: the answer's own, from its first mark to
/// its last with a margin, within the window asked (a day's window with a
/// minute of connections would draw them as one dot).
fn zoom(rows: &[Row], from: DateTime<Utc>, to: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let marks = || rows.iter().flat_map(|row| row.marks.iter());
    let (Some(first), Some(last)) = (marks().map(|m| m.0).min(), marks().map(|m| m.1.max(m.0)).max()) else {
        return (from, to);
    };
    let margin = ((last - first) / 20).max(chrono::Duration::seconds(1));
    let (start, end) = ((first - margin).max(from), (last + margin).min(to));
    if start < end { (start, end) } else { (from, to) }
}

fn draw(rows: &[Row], from: DateTime<Utc>, to: DateTime<Utc>, gaps: &[Gap]) -> Markup {
    let (from, to) = zoom(rows, from, to);
    let shown = &rows[..rows.len().min(MAX_ROWS)];
    let height = AXIS + ROW * shown.len().max(1) as f64 + 4.0;
    let span = (to - from).num_milliseconds().max(1) as f64;
    let x = |t: DateTime<Utc>| {
        LABEL + ((t - from).num_milliseconds() as f64 / span).clamp(0.0, 1.0) * (WIDTH - LABEL - 10.0)
    };
    let biggest = rows.iter().flat_map(|r| r.marks.iter().map(|m| m.2)).max().unwrap_or(1).max(1) as f64;
    // Area, not radius, follows the bytes.
    let radius = |bytes: u64| 2.5 + 6.0 * (bytes as f64 / biggest).sqrt();
    let ticks = 6;
    html! {
        svg.timeline xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(height) viewBox={"0 0 " (WIDTH) " " (height)} role="img" aria-label="timeline" {
            @for gap in gaps {
                @let (left, right) = (x(gap.from), x(gap.to));
                rect.gap x=(left) y="0" width=((right - left).max(2.0)) height=(height) fill="#f4c27a" fill-opacity="0.45" {
                    title { "capture gap: " (gap.from.to_rfc3339()) " to " (gap.to.to_rfc3339()) }
                }
            }
            @for tick in 0..=ticks {
                @let at = from + chrono::Duration::milliseconds((span * f64::from(tick) / f64::from(ticks)) as i64);
                line x1=(x(at)) x2=(x(at)) y1=(AXIS - 4.0) y2=(height) stroke="#e0e3e8" {}
                text x=(x(at)) y="12" text-anchor="middle" { (at.format("%m-%d %H:%M:%S")) }
            }
            @for (index, row) in shown.iter().enumerate() {
                @let y = AXIS + ROW * index as f64 + ROW / 2.0;
                text.label x="4" y=(y + 4.0) { (row.label.chars().take(40).collect::<String>()) }
                @for (start, end, bytes, what) in &row.marks {
                    line x1=(x(*start)) x2=(x(*end).max(x(*start) + 1.0)) y1=(y) y2=(y) stroke="#457b9d" stroke-width="3" {}
                    circle.mark cx=(x(*start)) cy=(y) r=(radius(*bytes)) fill="#1d3557" fill-opacity="0.7" {
                        title { (what) ", " (start.to_rfc3339()) }
                    }
                }
            }
        }
        @if rows.len() > MAX_ROWS {
            p { "The timeline shows the first " (MAX_ROWS) " of " (rows.len()) " rows; the table has them all." }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::gaps::LossKind;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn rows_per_device_marks_per_connection_and_gaps_shaded() {
        let record = |mac: &str, start: i64, bytes: u64| {
            let mut record = crate::store::test_records::sample(1);
            record.device.mac = Some(mac.into());
            record.start = at(start);
            record.end = at(start + 5);
            (record.bytes_up, record.bytes_down) = (bytes, 0);
            record
        };
        let records = [
            record("02:00:00:00:00:01", 10, 100),
            record("02:00:00:00:00:02", 20, 10_000),
            record("02:00:00:00:00:01", 30, 1),
        ];
        let gap = Gap { from: at(40), to: at(50), kind: LossKind::EventBufferFull, count: 3, place: "cpu 0".into() };
        let svg = of_records(&records, at(0), at(100), std::slice::from_ref(&gap)).into_string();
        assert_eq!(svg.matches("class=\"label\"").count(), 2, "a row per device: {svg}");
        assert_eq!(svg.matches("class=\"mark\"").count(), 3, "a mark per connection");
        assert_eq!(svg.matches("class=\"gap\"").count(), 1, "the gap shaded");
        // Drawn row by row: device 1's two, then device 2's, the biggest.
        let radii: Vec<f64> =
            svg.match_indices(" r=\"").map(|(i, _)| svg[i + 4..].split('"').next().unwrap().parse().unwrap()).collect();
        assert!(radii[2] > radii[0] && radii[0] > radii[1], "area follows bytes: {radii:?}");
        assert!(!svg.contains("style="), "no inline style: the CSP forbids it");
    }

    #[test]
    fn the_timeline_zooms_to_the_answers_own_span() {
        let mut record = crate::store::test_records::sample(1);
        (record.start, record.end) = (at(3_600), at(3_605));
        let mut later = record.clone();
        (later.start, later.end) = (at(3_700), at(3_710));
        // Asked over a day; the connections are within two minutes of it.
        let svg = of_records(&[record, later], at(0), at(86_400), &[]).into_string();
        let xs: Vec<f64> = svg
            .match_indices(" cx=\"")
            .map(|(i, _)| svg[i + 5..].split('"').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(xs.len(), 2);
        assert!(xs[1] - xs[0] > (WIDTH - LABEL) / 2.0, "the two connections drawn apart: {xs:?}");
        // Gaps outside the span are drawn at its edges, not past them.
        let gap = Gap { from: at(0), to: at(10), kind: LossKind::EventBufferFull, count: 1, place: "cpu 0".into() };
        let svg = of_records(&[], at(0), at(86_400), std::slice::from_ref(&gap)).into_string();
        assert!(svg.contains("class=\"gap\""), "no rows: the whole window, its gaps shown");
    }
}
