package pgwire

// Message types: the first byte of every message after startup. The same
// letter means different things in each direction ('D' is Describe from a
// client and DataRow from a server), so each constant names its sender.
// See https://www.postgresql.org/docs/current/protocol-message-formats.html.

// Messages a client (frontend) sends.
const (
	ClientBind         byte = 'B'
	ClientClose        byte = 'C'
	ClientCopyData     byte = 'd'
	ClientCopyDone     byte = 'c'
	ClientCopyFail     byte = 'f'
	ClientDescribe     byte = 'D'
	ClientExecute      byte = 'E'
	ClientFlush        byte = 'H'
	ClientFunctionCall byte = 'F'
	ClientParse        byte = 'P'
	ClientPassword     byte = 'p' // PasswordMessage, SASLInitialResponse, SASLResponse
	ClientQuery        byte = 'Q'
	ClientSync         byte = 'S'
	ClientTerminate    byte = 'X'
)

// Messages a server (backend) sends.
const (
	ServerAuthentication       byte = 'R'
	ServerBackendKeyData       byte = 'K'
	ServerBindComplete         byte = '2'
	ServerCloseComplete        byte = '3'
	ServerCommandComplete      byte = 'C'
	ServerCopyBothResponse     byte = 'W'
	ServerCopyData             byte = 'd'
	ServerCopyDone             byte = 'c'
	ServerCopyInResponse       byte = 'G'
	ServerCopyOutResponse      byte = 'H'
	ServerDataRow              byte = 'D'
	ServerEmptyQueryResponse   byte = 'I'
	ServerErrorResponse        byte = 'E'
	ServerFunctionCallResponse byte = 'V'
	ServerNegotiateProtocol    byte = 'v'
	ServerNoData               byte = 'n'
	ServerNoticeResponse       byte = 'N'
	ServerNotification         byte = 'A'
	ServerParameterDescription byte = 't'
	ServerParameterStatus      byte = 'S'
	ServerParseComplete        byte = '1'
	ServerPortalSuspended      byte = 's'
	ServerReadyForQuery        byte = 'Z'
	ServerRowDescription       byte = 'T'
)

// Transaction status in ReadyForQuery.
const (
	TxIdle    byte = 'I'
	TxInBlock byte = 'T' // in a transaction block
	TxFailed  byte = 'E' // in a failed transaction block
)

// Describe and Close name a prepared statement or a portal.
const (
	TargetStatement byte = 'S'
	TargetPortal    byte = 'P'
)
