//! Simulated payment: the one external side effect of the flow. Declined for buyers whose name starts with
//! `fail-`, so the demo and the tests can exercise the compensation path.

/// Why a payment was refused.
#[derive(Debug, thiserror::Error)]
#[error("payment of {amount_cents} cents declined for {buyer}")]
pub struct PaymentDeclined {
    /// The buyer.
    pub buyer: String,
    /// The amount.
    pub amount_cents: i64,
}

/// Charges `buyer` `amount_cents`. A real gateway call would run at least once per order (the inbox makes the
/// *database* effect exactly-once, not a remote call): it must take the order id as its idempotency key.
///
/// # Errors
/// [`PaymentDeclined`] for a buyer named `fail-…`.
pub fn charge(buyer: &str, amount_cents: i64) -> Result<(), PaymentDeclined> {
    if buyer.starts_with("fail-") {
        return Err(PaymentDeclined { buyer: buyer.to_owned(), amount_cents });
    }
    Ok(())
}
