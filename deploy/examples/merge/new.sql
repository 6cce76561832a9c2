-- The new store: accounts and profiles merged into one users table.
CREATE TABLE users (
    id     bigint PRIMARY KEY,
    name   text NOT NULL,
    email  text,
    bio    text,
    avatar bytea
);
