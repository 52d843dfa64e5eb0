//! `amoauth_events`: the outbox of events for the host app. A row is written where the
//! event happens and delivered by `serve`; a delivery is claimed with a lease, so two
//! replicas never send one event at the same time.

use std::borrow::Cow;

use sqlx::AssertSqlSafe;

use super::{Context as _, Store, StoreError, Timestamp, on_pool};

crate::named_values::named_values! {
    /// The values of `amoauth_events.status`.
    pub enum EventStatus {
        Pending => "pending",
        Delivered => "delivered",
        Failed => "failed",
    }
}

/// An outbox row.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub event_type: String,
    /// The event's `data`, as JSON text.
    pub payload: String,
    pub created_at: Timestamp,
    pub attempts: i64,
    pub next_attempt_at: Timestamp,
    pub lease_until: Option<Timestamp>,
    pub delivered_at: Option<Timestamp>,
    pub status: EventStatus,
    pub last_error: Option<String>,
}

/// An event to add to the outbox, written in the transaction of the change it reports.
#[derive(Clone, Debug)]
#[doc(hidden)]
pub struct NewEvent {
    pub event_type: &'static str,
    /// The event's `data`, as JSON text.
    pub payload: String,
    pub created_at: Timestamp,
}

macro_rules! select_event {
    () => {
        "SELECT id, event_type, payload, created_at, attempts, next_attempt_at, lease_until, \
         delivered_at, status, last_error FROM amoauth_events"
    };
}

/// Binds an event's fields, in the column order of `insert_event_sql`.
macro_rules! bind_event {
    ($query:expr, $event:expr) => {{
        let (event_type, payload, created_at, due_at) = $crate::store::events::event_values($event);
        $query
            .bind(event_type)
            .bind(payload)
            .bind(created_at)
            .bind(due_at)
    }};
}
pub(super) use bind_event;

/// Adds a pending event, due at once.
pub(super) const INSERT_EVENT: &str = "INSERT INTO amoauth_events (event_type, payload, \
     created_at, attempts, next_attempt_at, status) VALUES (?, ?, ?, 0, ?, 'pending')";

/// What `INSERT_EVENT` binds: the event's type, payload, creation time, and due time (now).
pub(super) fn event_values(event: &NewEvent) -> (&'static str, &str, Timestamp, Timestamp) {
    (
        event.event_type,
        &event.payload,
        event.created_at,
        event.created_at,
    )
}

#[doc(hidden)]
impl Store {
    /// Adds a pending event on its own, due at once; returns its id.
    pub async fn enqueue_event(&self, event: &NewEvent) -> Result<i64, StoreError> {
        const OPERATION: &str = "writing the event to the outbox";
        let (insert, last_id) = (self.insert_event_sql(), self.last_insert_id_sql());
        on_pool!(self, pool => {
            // The id is read on the connection that inserted the row.
            let mut conn = pool.acquire().await.during(OPERATION)?;
            bind_event!(sqlx::query(insert), event)
                .execute(&mut *conn)
                .await
                .during(OPERATION)?;
            sqlx::query_scalar(last_id).fetch_one(&mut *conn).await.during(OPERATION)
        })
    }

    /// Adds a pending event, due at once (bind with `bind_event!`).
    pub(super) fn insert_event_sql(&self) -> AssertSqlSafe<Cow<'static, str>> {
        self.sql(INSERT_EVENT)
    }

    /// Pending events due at `now` whose lease is free, oldest first. Not claimed yet:
    /// claim each with `claim_event` before sending it.
    pub async fn due_events(
        &self,
        now: Timestamp,
        limit: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        let sql = self.sql(concat!(
            select_event!(),
            " WHERE status = 'pending' AND next_attempt_at <= ? \
             AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at, id LIMIT ?"
        ));
        on_pool!(self, pool => sqlx::query_as(sql)
            .bind(now)
            .bind(now)
            .bind(limit)
            .fetch_all(pool)
            .await)
        .during("finding due events")
    }

    /// Claims one delivery until `until`, if the event is still pending, due, unleased and
    /// unchanged since it was read (`attempts`). Only the process that gets true sends it.
    pub async fn claim_event(
        &self,
        event: &EventRow,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError> {
        let sql = self.sql(
            "UPDATE amoauth_events SET lease_until = ? WHERE id = ? AND status = 'pending' \
             AND attempts = ? AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until <= ?)",
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(until)
            .bind(event.id)
            .bind(event.attempts)
            .bind(now)
            .bind(now)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() == 1))
        .during("claiming an event delivery")
    }

    /// The receiver took the event.
    pub async fn mark_event_delivered(&self, id: i64, now: Timestamp) -> Result<(), StoreError> {
        let sql = self.sql(
            "UPDATE amoauth_events SET status = 'delivered', attempts = attempts + 1, \
             delivered_at = ?, lease_until = NULL, last_error = NULL WHERE id = ? AND status = 'pending'",
        );
        on_pool!(self, pool => sqlx::query(sql).bind(now).bind(id).execute(pool).await.map(drop))
            .during("marking the event delivered")
    }

    /// A failed attempt: try again at `next_attempt_at`.
    pub async fn mark_event_retry(
        &self,
        id: i64,
        next_attempt_at: Timestamp,
        error: &str,
    ) -> Result<(), StoreError> {
        let sql = self.sql(
            "UPDATE amoauth_events SET attempts = attempts + 1, next_attempt_at = ?, \
             last_error = ?, lease_until = NULL WHERE id = ? AND status = 'pending'",
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(next_attempt_at)
            .bind(error)
            .bind(id)
            .execute(pool)
            .await
            .map(drop))
        .during("scheduling the event's next attempt")
    }

    /// The last attempt failed too: the event is given up.
    pub async fn mark_event_failed(&self, id: i64, error: &str) -> Result<(), StoreError> {
        let sql = self.sql(
            "UPDATE amoauth_events SET status = 'failed', attempts = attempts + 1, \
             last_error = ?, lease_until = NULL WHERE id = ? AND status = 'pending'",
        );
        on_pool!(self, pool => sqlx::query(sql).bind(error).bind(id).execute(pool).await.map(drop))
            .during("marking the event failed")
    }

    /// `amoauth events retry`: every failed event is pending again, with its attempts reset
    /// and due at `now`. Returns how many were requeued.
    pub async fn retry_failed_events(&self, now: Timestamp) -> Result<u64, StoreError> {
        let sql = self.sql(
            "UPDATE amoauth_events SET status = 'pending', attempts = 0, next_attempt_at = ?, \
             lease_until = NULL WHERE status = 'failed'",
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(now)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))
        .during("requeueing failed events")
    }

    /// Pending and failed events, oldest first.
    pub async fn undelivered_events(&self, limit: i64) -> Result<Vec<EventRow>, StoreError> {
        let sql = self.sql(concat!(
            select_event!(),
            " WHERE status IN ('pending', 'failed') ORDER BY id LIMIT ?"
        ));
        on_pool!(self, pool => sqlx::query_as(sql).bind(limit).fetch_all(pool).await)
            .during("listing undelivered events")
    }

    /// How many events have each status.
    pub async fn event_counts(&self) -> Result<Vec<(EventStatus, i64)>, StoreError> {
        let sql = self.sql(
            "SELECT status, COUNT(*) AS n FROM amoauth_events GROUP BY status ORDER BY status",
        );
        on_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await).during("counting events")
    }
}
