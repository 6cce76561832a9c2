-- The data audit's fixture on new (see audit_old.sql).
CREATE TABLE clients (id int PRIMARY KEY, name text);
CREATE TABLE purchases (id bigint PRIMARY KEY, customer_id int REFERENCES clients (id), code varchar(10),
	note text NOT NULL, qty integer, ref text UNIQUE, total numeric(12,2) CHECK (total >= 0), amount int);
