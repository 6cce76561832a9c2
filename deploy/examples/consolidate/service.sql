-- Each service's own database (old store): shop and billing have the same
-- orders table, and their ids overlap.
CREATE TABLE orders (
    id         bigint PRIMARY KEY,
    total      numeric(12,2),
    created_at timestamptz
);
