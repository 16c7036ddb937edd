//! Integration tests: real relay, real model, real wallet code, real peers, all on loopback.

mod harness;

mod account_api;
mod bad_input;
mod browser;
mod chat_api;
mod conformance;
mod continuation;
mod credit;
mod delivery;
mod durability;
mod embedded_relay;
mod estimates;
mod gaps;
mod http_limits;
mod http_payment;
mod http_session;
mod interop;
mod l402_api;
mod lnbits;
mod load;
mod lying_relay;
mod nip98;
mod nwc;
mod openai_job;
mod paid_job;
mod payment;
mod payouts;
mod receipts;
mod restart;
mod store_fault;
mod trust;
mod two_relays;
mod wallets;
mod withdraw;
mod zaps;
