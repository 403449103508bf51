//! The bus conformance suite (`tandem_testkit::conformance`) against a
//! Kafka-compatible broker (`TANDEM_TEST_KAFKA`, default
//! `kafka://127.0.0.1:19092`; `scripts/engines up` starts one).

mod common;

use tandem_testkit::conformance::{BusFeatures, Fresh};

async fn fresh_kafka() -> Fresh<tandem_kafka::KafkaBus> {
    let bus = common::connect().await;
    let scratch = common::Scratch::new(&bus);
    Fresh::new(bus, scratch)
}

tandem_testkit::bus_conformance!(
    kafka,
    fresh_kafka(),
    BusFeatures {
        every_member_reads_every_partition: false,
        members_split_partitions: true,
        shares_partitions: false,
        redelivers_unacked_to_other_members: false,
    }
);
