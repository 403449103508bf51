//! The bus conformance suite (`tandem_testkit::conformance`) against NATS
//! JetStream; every test has a subject prefix (namespace) of its own.

mod common;

use common::{connect, unique_prefix, Namespace};
use tandem_testkit::conformance::{BusFeatures, Fresh};

/// A bus in a fresh namespace. Small pulls (`fetch_batch=5`), so that one
/// member of a group cannot take every record at once and the group checks
/// see the work shared; the redelivery backoff equal to `ack_wait` (2 s),
/// so that the bus's longest redelivery delay, which the hand-over check
/// waits out twice, stays short.
async fn fresh_nats() -> Fresh<tandem_nats::NatsBus> {
    let bus = connect(&unique_prefix(), "&fetch_batch=5&backoff_ms=2000").await;
    Fresh::new(bus.clone(), Namespace(bus))
}

tandem_testkit::bus_conformance!(
    nats,
    fresh_nats(),
    BusFeatures {
        every_member_reads_every_partition: false,
        members_split_partitions: false,
        shares_partitions: true,
        redelivers_unacked_to_other_members: true,
    }
);
