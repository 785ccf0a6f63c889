-- The application's database role, made or brought up to date at every start (the `db-setup` one-shot
-- service runs this as the superuser before `migrate`). The app connects as this role, never as the
-- superuser: it owns the stack's database (so the migrations run as it too) and nothing more. It cannot
-- `COPY ... TO PROGRAM`, read server files, create roles or databases, and it does not use the
-- connection slots reserved for superusers that the connection arithmetic (README.md) counts on.
-- Values come from the environment (\getenv, psql 15+): APP_DB_USER, APP_DB_PASSWORD, DB_NAME.
\set ON_ERROR_STOP on
\getenv app_user APP_DB_USER
\getenv app_password APP_DB_PASSWORD
\getenv db_name DB_NAME

-- Never demote the superuser this script runs as.
SELECT :'app_user' = current_user AS is_superuser_itself \gset
\if :is_superuser_itself
  \echo 'APP_DB_USER must not be the superuser (' :'app_user' ')'
  SELECT 1/0;
\endif

SELECT format('CREATE ROLE %I LOGIN', :'app_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_user') \gexec
ALTER ROLE :"app_user" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'app_password';
ALTER DATABASE :"db_name" OWNER TO :"app_user";

-- A volume from before this role existed: its tables (and their sequences) belonged to the superuser.
SELECT format('ALTER TABLE %I.%I OWNER TO %I', schemaname, tablename, :'app_user')
  FROM pg_tables WHERE schemaname = 'public' AND tableowner <> :'app_user' \gexec
SELECT format('ALTER SEQUENCE %I.%I OWNER TO %I', schemaname, sequencename, :'app_user')
  FROM pg_sequences WHERE schemaname = 'public' AND sequenceowner <> :'app_user' \gexec
