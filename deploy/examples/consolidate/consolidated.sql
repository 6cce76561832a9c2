-- The one new database both services move to: every row carries its
-- tenant, which is part of the key.
CREATE TABLE orders (
    tenant     text,
    id         bigint,
    total      numeric(12,2),
    created_at timestamptz,
    PRIMARY KEY (tenant, id)
);
