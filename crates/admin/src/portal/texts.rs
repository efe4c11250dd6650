//! Every sentence of the portal, in English and French. Placeholders in braces
//! (`{product}`, `{provider}`, `{account}`, `{from}`, `{reason}`, `{at}`) are
//! filled by the page code; the template engine escapes the result.

/// The languages of the portal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Locale {
    En,
    Fr,
}

impl Locale {
    pub(crate) fn parse(raw: &str) -> Option<Locale> {
        let primary = raw.trim().split(['-', '_']).next()?.to_ascii_lowercase();
        match primary.as_str() {
            "en" => Some(Locale::En),
            "fr" => Some(Locale::Fr),
            _ => None,
        }
    }

    /// The first language of an `Accept-Language` header we have, by weight
    /// (RFC 9110 §12.5.4); English when none.
    pub(crate) fn from_accept_language(header: Option<&str>) -> Locale {
        let mut best: Option<(f32, Locale)> = None;
        for item in header.unwrap_or_default().split(',') {
            let mut parts = item.split(';');
            let tag = parts.next().unwrap_or_default();
            let weight = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if let Some(locale) = Locale::parse(tag)
                && weight > 0.0
                && best.is_none_or(|(w, _)| weight > w)
            {
                best = Some((weight, locale));
            }
        }
        best.map_or(Locale::En, |(_, l)| l)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Locale::En => "en",
            Locale::Fr => "fr",
        }
    }

    /// The sentence `key` in this language; empty when unknown (the table's unit
    /// test and the pages' tests keep keys and sentences in step).
    pub(crate) fn text(self, key: &str) -> &'static str {
        TEXTS
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, en, fr)| match self {
                Locale::En => *en,
                Locale::Fr => *fr,
            })
            .unwrap_or("")
    }

    /// Whether there is a sentence `key`.
    pub(crate) fn has(key: &str) -> bool {
        TEXTS.iter().any(|(k, _, _)| *k == key)
    }

    /// Every sentence, for the template (`t.key`).
    pub(crate) fn all(self) -> std::collections::BTreeMap<&'static str, &'static str> {
        TEXTS
            .iter()
            .map(|(k, en, fr)| {
                (
                    *k,
                    match self {
                        Locale::En => *en,
                        Locale::Fr => *fr,
                    },
                )
            })
            .collect()
    }
}

/// (key, English, French).
const TEXTS: &[(&str, &str, &str)] = &[
    ("title", "Email sending", "Envoi des e-mails"),
    (
        "lead",
        "Choose the mailbox {product} sends your organization's notifications from.",
        "Choisissez la boîte aux lettres depuis laquelle {product} envoie les notifications de votre organisation.",
    ),
    ("back", "Back to {product}", "Retour à {product}"),
    ("status_heading", "Current status", "État actuel"),
    (
        "status_not_configured",
        "Platform sender in use",
        "Expéditeur de la plateforme",
    ),
    (
        "status_not_configured_text",
        "Notifications are sent from {product}'s own address. Connect your Microsoft 365 or Google Workspace mailbox to send them from your organization's address.",
        "Les notifications partent de l'adresse de {product}. Connectez votre boîte Microsoft 365 ou Google Workspace pour les envoyer depuis l'adresse de votre organisation.",
    ),
    (
        "status_pending_sender",
        "Connected, waiting for a sender",
        "Connecté, expéditeur à renseigner",
    ),
    (
        "status_pending_sender_text",
        "{provider} is connected as {account}. Enter the sender below and save: until a test message goes out, notifications are still sent from {product}'s address.",
        "{provider} est connecté avec le compte {account}. Renseignez l'expéditeur ci-dessous et enregistrez : tant qu'un message de test n'est pas parti, les notifications partent encore de l'adresse de {product}.",
    ),
    ("status_active", "Active", "Actif"),
    (
        "status_active_text",
        "Notifications are sent through {provider} from {from}.",
        "Les notifications sont envoyées par {provider} depuis {from}.",
    ),
    (
        "status_needs_reauth",
        "Needs reconnection",
        "Reconnexion nécessaire",
    ),
    (
        "status_needs_reauth_text",
        "{provider} no longer accepts this connection: {reason}. Connect again to send from your address.",
        "{provider} n'accepte plus cette connexion : {reason}. Reconnectez-vous pour envoyer depuis votre adresse.",
    ),
    (
        "needs_reauth_fallback",
        "Meanwhile, notifications are sent from {product}'s address.",
        "En attendant, les notifications partent de l'adresse de {product}.",
    ),
    (
        "needs_reauth_no_fallback",
        "Meanwhile, notifications cannot be sent.",
        "En attendant, les notifications ne peuvent pas être envoyées.",
    ),
    (
        "paused_sending_blocked",
        "{provider} is blocking this mailbox from sending (often after an outbound spam alert): notifications wait until {until}. Once your administrator has released the account, save and test below to resume at once.",
        "{provider} bloque l'envoi depuis cette boîte (souvent après une alerte de spam sortant) : les notifications attendent jusqu'au {until}. Une fois le compte débloqué par votre administrateur, enregistrez et testez ci-dessous pour reprendre aussitôt.",
    ),
    (
        "paused_throttled",
        "{provider} asked to slow down: notifications wait until {until}.",
        "{provider} a demandé de ralentir : les notifications attendent jusqu'au {until}.",
    ),
    (
        "last_test_sent",
        "Last test: sent on {at} from {from}.",
        "Dernier test : envoyé le {at} depuis {from}.",
    ),
    (
        "last_test_failed",
        "Last test, on {at}, from {from}: failed. {reason}",
        "Dernier test, le {at}, depuis {from} : échec. {reason}",
    ),
    (
        "connect_heading",
        "Connect a mailbox",
        "Connecter une boîte aux lettres",
    ),
    (
        "reconnect_heading",
        "Reconnect or change provider",
        "Reconnecter ou changer de fournisseur",
    ),
    (
        "connect_help",
        "You sign in with the provider and allow {product} to send mail as you; then you come back here.",
        "Vous vous connectez chez le fournisseur et autorisez {product} à envoyer des e-mails en votre nom, puis vous revenez ici.",
    ),
    (
        "connect_microsoft",
        "Connect Microsoft 365",
        "Connecter Microsoft 365",
    ),
    ("connect_google", "Connect Google", "Connecter Google"),
    ("sender_heading", "Sender", "Expéditeur"),
    ("sender_email", "Sender address", "Adresse d'expédition"),
    (
        "sender_email_hint_microsoft",
        "The connected account's address, or a shared mailbox it has Send As rights on.",
        "L'adresse du compte connecté, ou une boîte partagée sur laquelle il a le droit « Envoyer en tant que ».",
    ),
    (
        "sender_email_hint_google",
        "The connected account's address, or one of its verified Gmail aliases.",
        "L'adresse du compte connecté, ou l'un de ses alias Gmail vérifiés.",
    ),
    ("sender_name", "Display name", "Nom affiché"),
    (
        "sender_name_hint",
        "Shown to recipients next to the address, for example your organization's name. Without “@”.",
        "Affiché aux destinataires à côté de l'adresse, par exemple le nom de votre organisation. Sans « @ ».",
    ),
    (
        "fallback_label",
        "If the connection stops working, send from {product}'s address meanwhile",
        "Si la connexion ne fonctionne plus, envoyer depuis l'adresse de {product} en attendant",
    ),
    ("save_and_test", "Save and test", "Enregistrer et tester"),
    (
        "save_hint",
        "A test message is sent to {account}. The sender is saved only if the test goes out.",
        "Un message de test est envoyé à {account}. L'expéditeur n'est enregistré que si le test part.",
    ),
    ("disconnect_heading", "Disconnect", "Déconnecter"),
    (
        "disconnect_text",
        "After disconnecting, notifications are sent from {product}'s address again, and {product} no longer has access to the {provider} account.",
        "Après la déconnexion, les notifications repartent de l'adresse de {product}, et {product} n'a plus accès au compte {provider}.",
    ),
    (
        "disconnect_confirm",
        "I understand: notifications will come from {product}'s address",
        "J'ai compris : les notifications partiront de l'adresse de {product}",
    ),
    ("disconnect", "Disconnect", "Déconnecter"),
    (
        "notice_connected",
        "{provider} is connected as {account}. Now enter the sender and save.",
        "{provider} est connecté avec le compte {account}. Renseignez maintenant l'expéditeur et enregistrez.",
    ),
    (
        "notice_reconnected_active",
        "Reconnected. The saved sender passed its test again: sending from your address resumes.",
        "Reconnecté. L'expéditeur enregistré a de nouveau passé le test : l'envoi depuis votre adresse reprend.",
    ),
    (
        "notice_reconnected_failed",
        "Reconnected, but the saved sender did not pass its test. Check the sender below.",
        "Reconnecté, mais l'expéditeur enregistré n'a pas passé le test. Vérifiez l'expéditeur ci-dessous.",
    ),
    (
        "notice_test_sent",
        "Test sent. Recipients will see: {from}. Check the inbox of {account}.",
        "Test envoyé. Les destinataires verront : {from}. Vérifiez la boîte de réception de {account}.",
    ),
    (
        "notice_test_failed",
        "The test failed, so the sender was not saved. {reason}",
        "Le test a échoué : l'expéditeur n'a pas été enregistré. {reason}",
    ),
    (
        "notice_disconnected",
        "Disconnected. Notifications are sent from {product}'s address.",
        "Déconnecté. Les notifications partent de l'adresse de {product}.",
    ),
    (
        "notice_rate_limited",
        "Too many tests in a short time. Wait a few minutes, then try again.",
        "Trop de tests en peu de temps. Attendez quelques minutes puis réessayez.",
    ),
    (
        "notice_not_connected",
        "Connect a provider first.",
        "Connectez d'abord un fournisseur.",
    ),
    (
        "notice_form_expired",
        "This form has expired. Please try again.",
        "Ce formulaire a expiré. Veuillez réessayer.",
    ),
    (
        "notice_failed",
        "Something went wrong on our side. Please try again in a moment.",
        "Une erreur s'est produite de notre côté. Réessayez dans un instant.",
    ),
    (
        "notice_invalid_sender",
        "Check the sender: nothing was saved.",
        "Vérifiez l'expéditeur : rien n'a été enregistré.",
    ),
    (
        "test_sender_not_allowed",
        "The provider does not let the connected account send from this address.",
        "Le fournisseur n'autorise pas le compte connecté à envoyer depuis cette adresse.",
    ),
    (
        "test_auth_revoked",
        "The provider refused the connection: connect again.",
        "Le fournisseur a refusé la connexion : reconnectez-vous.",
    ),
    (
        "test_other",
        "The provider did not accept the message.",
        "Le fournisseur n'a pas accepté le message.",
    ),
    (
        "err_access_denied",
        "The permission request was declined: nothing was connected.",
        "La demande d'autorisation a été refusée : rien n'a été connecté.",
    ),
    (
        "err_admin_approval_required",
        "Your organization lets only administrators approve apps. Ask your Microsoft 365 administrator to approve {product}, then connect again.",
        "Votre organisation réserve l'approbation des applications aux administrateurs. Demandez à votre administrateur Microsoft 365 d'approuver {product}, puis reconnectez-vous.",
    ),
    (
        "err_scope_not_granted",
        "A required permission was not granted. Connect again and keep every permission ticked.",
        "Une autorisation nécessaire n'a pas été accordée. Reconnectez-vous en laissant toutes les autorisations cochées.",
    ),
    (
        "err_no_mailbox",
        "This account has no mailbox to send from. Sign in with an account that has one.",
        "Ce compte n'a pas de boîte aux lettres d'où envoyer. Connectez-vous avec un compte qui en a une.",
    ),
    (
        "err_personal_account_not_supported",
        "Personal Microsoft accounts cannot be used: sign in with a work or school account.",
        "Les comptes Microsoft personnels ne peuvent pas être utilisés : connectez-vous avec un compte professionnel ou scolaire.",
    ),
    (
        "err_state_expired",
        "The connection took too long. Please start again.",
        "La connexion a pris trop de temps. Recommencez.",
    ),
    (
        "err_state_reused",
        "This connection attempt was already used. Please start again.",
        "Cette tentative de connexion a déjà servi. Recommencez.",
    ),
    (
        "err_connection_expired",
        "The connection was not completed in time. Please start again.",
        "La connexion n'a pas été terminée à temps. Recommencez.",
    ),
    (
        "err_connection_used",
        "This connection was already completed.",
        "Cette connexion a déjà été terminée.",
    ),
    (
        "err_other_browser",
        "This consent was given in another browser session, so it was not attached to your organization. Start the connection again from this page, in this browser.",
        "Ce consentement a été donné dans une autre session de navigateur : il n'a pas été rattaché à votre organisation. Relancez la connexion depuis cette page, dans ce navigateur.",
    ),
    (
        "err_generic",
        "The connection did not succeed ({code}). Please try again.",
        "La connexion n'a pas abouti ({code}). Réessayez.",
    ),
    (
        "field_invalid_email",
        "Enter a valid address, such as notifications@example.com.",
        "Saisissez une adresse valide, par exemple notifications@example.com.",
    ),
    (
        "field_name_with_at",
        "The display name cannot contain “@”: Microsoft refuses such names.",
        "Le nom affiché ne peut pas contenir « @ » : Microsoft refuse ces noms.",
    ),
    (
        "field_name_invalid",
        "This display name cannot be used: {reason}.",
        "Ce nom affiché ne peut pas être utilisé : {reason}.",
    ),
    (
        "field_sender_not_allowed",
        "This address cannot be the sender: {reason}.",
        "Cette adresse ne peut pas être l'expéditeur : {reason}.",
    ),
    (
        "link_expired_heading",
        "This link has expired",
        "Ce lien a expiré",
    ),
    (
        "link_expired_text",
        "Links to this page work for a few minutes only. Go back and open the email settings again.",
        "Les liens vers cette page ne fonctionnent que quelques minutes. Revenez en arrière et rouvrez les paramètres d'envoi.",
    ),
    (
        "link_used_heading",
        "This link was already used",
        "Ce lien a déjà été utilisé",
    ),
    (
        "link_used_text",
        "For your security, a link opens this page only once. Go back and open the email settings again.",
        "Pour votre sécurité, un lien n'ouvre cette page qu'une fois. Revenez en arrière et rouvrez les paramètres d'envoi.",
    ),
    (
        "link_unknown_heading",
        "This link is not valid",
        "Ce lien n'est pas valide",
    ),
    (
        "link_unknown_text",
        "Open the email settings again from your application.",
        "Rouvrez les paramètres d'envoi depuis votre application.",
    ),
    (
        "session_expired_heading",
        "Your session has ended",
        "Votre session est terminée",
    ),
    (
        "session_expired_text",
        "Go back and open the email settings again.",
        "Revenez en arrière et rouvrez les paramètres d'envoi.",
    ),
    (
        "other_browser_heading",
        "Nothing was connected",
        "Rien n'a été connecté",
    ),
    ("provider_microsoft", "Microsoft 365", "Microsoft 365"),
    ("provider_google", "Google Workspace", "Google Workspace"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sentence_exists_in_both_languages_once() {
        let mut keys = std::collections::HashSet::new();
        for (key, en, fr) in TEXTS {
            assert!(keys.insert(key), "{key} twice");
            assert!(!en.is_empty() && !fr.is_empty(), "{key} empty");
            // The same placeholders in both languages.
            let holes = |s: &str| {
                let mut v: Vec<String> = s
                    .split('{')
                    .skip(1)
                    .filter_map(|p| p.split_once('}').map(|(h, _)| h.to_owned()))
                    .collect();
                v.sort();
                v
            };
            assert_eq!(holes(en), holes(fr), "{key}");
        }
    }

    #[test]
    fn accept_language_picks_the_heaviest_language_we_have() {
        assert_eq!(
            Locale::from_accept_language(Some("de-DE,fr;q=0.8,en;q=0.5")),
            Locale::Fr
        );
        assert_eq!(
            Locale::from_accept_language(Some("fr-CA;q=0.3, en-GB")),
            Locale::En
        );
        assert_eq!(Locale::from_accept_language(Some("de, it")), Locale::En);
        assert_eq!(Locale::from_accept_language(Some("fr;q=0")), Locale::En);
        assert_eq!(Locale::from_accept_language(None), Locale::En);
    }
}
