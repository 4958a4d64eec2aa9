-- Label Studio's own database next to the backend's ("ihp", made by POSTGRES_DB)
CREATE DATABASE labelstudio OWNER ihp;
